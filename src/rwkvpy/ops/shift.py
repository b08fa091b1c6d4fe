"""Token shift: each position sees the previous position's input (the first sees the state).

Sequences are (B, T, C); a single token per stream (decoding) is (B, C).
"""

import torch
from torch import Tensor


def token_shift(x: Tensor, last: Tensor) -> Tensor:
    """x (B, T, C) or (B, C), last (B, C) -> the input delayed by one step, starting with ``last``."""
    if last.dtype != x.dtype:
        last = last.to(x.dtype)
    if x.dim() == 2:
        return last
    return last.unsqueeze(1) if x.shape[1] == 1 else torch.cat([last.unsqueeze(1), x[:, :-1]], dim=1)


def time_mix(x: Tensor, shifted: Tensor, *mixes: Tensor) -> tuple[Tensor, ...]:
    """Interpolate between the current and the previous token, once per mix (any shape that
    flattens to (C,)): mix * x + (1 - mix) * shifted (the difference is shared: one fused op
    per mix)."""
    d = x - shifted
    return tuple(torch.addcmul(shifted, mix.view(-1), d) for mix in mixes)
