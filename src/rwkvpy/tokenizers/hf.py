"""Hugging Face ``tokenizer.json`` files (GPT-NeoX 20B for the RWKV-4 Pile and Raven models),
through the ``tokenizers`` library."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import RwkvpyError


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class HFTokenizer:
    name = "hf"

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tokenizer

        path = Path(path)
        if not path.is_file():
            raise RwkvpyError(f"{path}: no such file")
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exception subclasses from Rust
            line = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise RwkvpyError(f"{path}: not a valid tokenizer.json: {line}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        decoder = _byte_decoder()
        self._bytes: list[bytes] = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None:
                self._bytes.append(b"")
            elif piece in added or any(c not in decoder for c in piece):
                self._bytes.append(piece.encode("utf-8"))
            else:
                self._bytes.append(bytes(decoder[c] for c in piece))
        self.name = "20B" if self.vocab_size == 50277 else "hf"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode_bytes(self, ids: list[int]) -> bytes:
        table, n = self._bytes, self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise RwkvpyError(f"token id {i} is outside the tokenizer's vocabulary [0, {n})")
        return b"".join(table[i] for i in ids)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
