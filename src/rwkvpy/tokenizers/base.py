"""The interface every tokenizer implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids. ``decode_bytes`` lets streaming output stop at UTF-8 boundaries."""

    name: str
    vocab_size: int  # one more than the largest id the tokenizer can produce

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def decode_bytes(self, ids: list[int]) -> bytes: ...
