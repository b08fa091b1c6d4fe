"""Loss of a model over a whole split of a text file (every window, not a sample)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RwkvpyError
from .data import load_data


@torch.no_grad()
def summed_loss(model, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Sum of next-token losses (nats) over windows x -> y, a batch of windows at a time."""
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(x), batch_size):
        logits, _ = model(x[i : i + batch_size].to(device), return_state=False)
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                 y[i : i + batch_size].reshape(-1).to(device), reduction="sum").item()
    return total


@torch.no_grad()
def evaluate_file(model, path, tokenizer=None, ctx_len: int = 64, val_fraction: float = 0.1,
                  split: str = "val", batch_size: int = 32) -> dict:
    """Mean next-token loss over consecutive, non-overlapping windows of ``ctx_len`` tokens,
    each from a fresh state (as during training), and the same in bits per byte."""
    data = load_data(path, tokenizer, val_fraction, ctx_len)
    if data.vocab_size > model.config.vocab_size:
        raise RwkvpyError(f"{path}: data vocabulary {data.vocab_size} exceeds the model's {model.config.vocab_size}")
    tokens = data.val if split == "val" else np.concatenate([data.train, data.val])
    n_windows = (len(tokens) - 1) // ctx_len
    rows = np.asarray(tokens[: n_windows * ctx_len + 1], dtype=np.int64)
    x = torch.from_numpy(rows[:-1].reshape(n_windows, ctx_len))
    y = torch.from_numpy(rows[1:].reshape(n_windows, ctx_len))
    total = summed_loss(model, x, y, batch_size)
    n = n_windows * ctx_len
    loss = total / n
    if tokenizer is None:
        n_bytes = n
    else:
        n_bytes = len(tokenizer.decode_bytes(rows[1:].tolist()))
    return {"split": split, "loss": loss, "bits_per_byte": total / math.log(2) / n_bytes, "tokens": n,
            "ctx_len": ctx_len}
