"""Plain UTF-8 bytes: token id = byte value, vocabulary 256."""

from __future__ import annotations

from ..errors import RwkvpyError


class ByteTokenizer:
    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids: list[int]) -> bytes:
        try:
            return bytes(ids)
        except ValueError:
            bad = next(i for i in ids if not 0 <= i < 256)
            raise RwkvpyError(f"token id {bad} is not a byte (0..255)") from None

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
