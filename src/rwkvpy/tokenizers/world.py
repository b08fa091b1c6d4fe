"""The RWKV World tokenizer: greedy longest match over UTF-8 bytes.

The vocabulary file (``rwkv_vocab_v20230424.txt``) has one token per line:
``<id> <Python repr of a str or bytes> <length in bytes>``. Lines may end in LF or CRLF.
Reprs are parsed with ``ast.literal_eval``, never ``eval``.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

from ..errors import RwkvpyError


class WorldTokenizer:
    name = "world"

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        try:
            raw = path.read_bytes().decode("utf-8")
        except OSError as e:
            raise RwkvpyError(f"{path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise RwkvpyError(f"{path}: not UTF-8 text, so not a World vocabulary file") from None
        self.id_to_bytes: dict[int, bytes] = {}
        # Only LF / CRLF end a line: str.splitlines would also split at \x0b, \x85, \u2028...
        for n, line in enumerate(raw.split("\n"), 1):
            line = line.removesuffix("\r")
            if line.strip():
                self._parse_line(path, n, line)
        if not self.id_to_bytes:
            raise RwkvpyError(f"{path}: no tokens in the vocabulary file")
        self.bytes_to_id = {b: i for i, b in self.id_to_bytes.items()}
        self.vocab_size = max(self.id_to_bytes) + 1
        # Candidate token lengths by the first two bytes, longest first: the longest token
        # that is a prefix of the remaining input is found by at most a few dict lookups.
        lengths: dict[bytes, set[int]] = {}
        for b in self.bytes_to_id:
            if len(b) >= 2:
                lengths.setdefault(b[:2], set()).add(len(b))
        self._lengths = {k: sorted(v, reverse=True) for k, v in lengths.items()}

    def _parse_line(self, path: Path, n: int, line: str) -> None:
        try:
            first, last = line.index(" "), line.rindex(" ")
            idx, length = int(line[:first]), int(line[last:])
            value = ast.literal_eval(line[first:last].strip())
        except (ValueError, SyntaxError):
            raise RwkvpyError(f"{path}: line {n} is not '<id> <repr> <length>': {line[:60]!r}") from None
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, bytes) or len(value) != length:
            raise RwkvpyError(f"{path}: line {n}: token {value!r} does not have {length} bytes")
        if idx in self.id_to_bytes:
            raise RwkvpyError(f"{path}: line {n}: id {idx} appears twice")
        self.id_to_bytes[idx] = value

    def encode_bytes(self, src: bytes) -> list[int]:
        out, pos, n = [], 0, len(src)
        table, lengths = self.bytes_to_id, self._lengths
        while pos < n:
            for length in lengths.get(src[pos : pos + 2], ()):
                token = table.get(src[pos : pos + length])
                if token is not None:
                    break
            else:
                token = table.get(src[pos : pos + 1])
                length = 1
                if token is None:
                    raise RwkvpyError(f"byte {src[pos]:#04x} has no token in the World vocabulary")
            out.append(token)
            pos += length
        return out

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(text.encode("utf-8"))

    def decode_bytes(self, ids: list[int]) -> bytes:
        try:
            return b"".join(self.id_to_bytes[i] for i in ids)
        except KeyError as e:
            raise RwkvpyError(f"token id {e.args[0]} is not in the World vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
