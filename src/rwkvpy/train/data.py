"""Training data: a text file as bytes, or tokenized once into a memory-mapped ``.bin``.

Splits are contiguous: the last ``val_fraction`` of the tokens is the validation split.
Windows are drawn at random positions by a ``torch.Generator`` whose state is checkpointed,
so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import RwkvpyError
from ..io import atomic_write, atomic_write_text
from ..tokenizers.base import Tokenizer


@dataclass
class TokenData:
    train: np.ndarray  # token ids (a memmap for tokenized files)
    val: np.ndarray
    vocab_size: int
    val_bytes: int  # UTF-8 bytes the validation tokens stand for: for bits per byte

    @property
    def bytes_per_val_token(self) -> float:
        return self.val_bytes / max(1, len(self.val))


def load_data(path: str | os.PathLike, tokenizer: Tokenizer | None = None, val_fraction: float = 0.1,
              ctx_len: int = 64) -> TokenData:
    """Bytes (tokenizer None) or tokens of a UTF-8 text file, split and checked against ctx_len."""
    path = Path(path)
    if not path.is_file():
        raise RwkvpyError(f"{path}: no such data file")
    if not 0 < val_fraction < 1:
        raise RwkvpyError(f"val_fraction must be in (0, 1), got {val_fraction}")
    raw = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    if len(raw) == 0:
        raise RwkvpyError(f"{path}: the data file is empty")
    if tokenizer is None:
        tokens, vocab = raw, 256
    else:
        tokens, vocab = _tokenized(path, tokenizer), tokenizer.vocab_size
    n_val = max(1, int(len(tokens) * val_fraction))
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    for name, split in (("training", train), ("validation", val)):
        if len(split) < ctx_len + 1:
            raise RwkvpyError(
                f"{path}: the {name} split has {len(split)} tokens, fewer than ctx_len + 1 = {ctx_len + 1}"
            )
    if tokenizer is None:
        val_bytes = len(val)
    else:
        val_bytes = len(tokenizer.decode_bytes(np.asarray(val).tolist()))
    return TokenData(train, val, vocab, val_bytes)


def _tokenized(path: Path, tokenizer: Tokenizer) -> np.ndarray:
    """Token ids of a text file, cached beside it as ``<file>.<tokenizer>.bin`` (+ ``.json``)."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    cache = path.with_name(f"{path.name}.{tokenizer.name}.bin")
    meta_path = cache.with_suffix(".json")
    meta = {"source_sha256_16": digest, "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "dtype": np.dtype(dtype).name}
    if cache.is_file() and meta_path.is_file():
        try:
            saved = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            saved = None
        if saved and {k: saved.get(k) for k in meta} == meta:
            return np.memmap(cache, dtype=dtype, mode="r")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RwkvpyError(f"{path}: not UTF-8 text (byte {e.start}); use byte-level training instead") from None
    ids = np.asarray(tokenizer.encode(text), dtype=dtype)
    atomic_write(cache, lambda tmp: ids.tofile(tmp))
    atomic_write_text(meta_path, json.dumps({**meta, "tokens": int(len(ids))}))
    return np.memmap(cache, dtype=dtype, mode="r")


class WindowSampler:
    """Random (x, y) windows of ``ctx_len`` tokens from one split; y is x shifted by one."""

    def __init__(self, tokens: np.ndarray, ctx_len: int, seed: int):
        self.tokens, self.ctx_len = tokens, ctx_len
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.tokens) - self.ctx_len, (batch_size,), generator=self.generator)
        return windows(self.tokens, starts.tolist(), self.ctx_len)


def windows(tokens: np.ndarray, starts, ctx_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(tokens[s : s + ctx_len + 1], dtype=np.int64) for s in starts])
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


def eval_starts(n_tokens: int, ctx_len: int, count: int) -> list[int]:
    """Evenly spaced, fixed window starts over a split: the same windows at every evaluation."""
    last = n_tokens - ctx_len - 1
    if count <= 1 or last <= 0:
        return [0] * max(count, 1)
    return [round(i * last / (count - 1)) for i in range(count)]
