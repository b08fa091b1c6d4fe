"""Token shift: each position sees the previous position's input (the first sees the state)."""

import torch
from torch import Tensor


def token_shift(x: Tensor, last: Tensor) -> Tensor:
    """x (B, T, C), last (B, C) -> the sequence delayed by one step, starting with ``last``."""
    last = last.unsqueeze(1) if last.dtype == x.dtype else last.unsqueeze(1).to(x.dtype)
    return last if x.shape[1] == 1 else torch.cat([last, x[:, :-1]], dim=1)


def time_mix(x: Tensor, shifted: Tensor, *mixes: Tensor) -> tuple[Tensor, ...]:
    """Interpolate between the current and the previous token, once per mix:
    mix * x + (1 - mix) * shifted (the difference is shared: one fused op per mix)."""
    d = x - shifted
    return tuple(torch.addcmul(shifted, mix, d) for mix in mixes)
