"""Token shift and time mixing: each position interpolates between its own input and the
previous position's (the first position: the state's last input).

    shifted = shift(x, last),   out_i = shifted + mix_i (x - shifted)   for each mix_i (C,)

Sequences are (B, T, C); a single token per stream (decoding) is (B, C), and there
:func:`interpolate_token` computes every mix of a layer in one op.
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


def _interpolate(x: Tensor, shifted: Tensor, mixes) -> tuple[Tensor, Tensor]:
    d = x - shifted  # shared: one fused op per mix
    return d, tuple(torch.addcmul(shifted, mix.view(-1), d) for mix in mixes)


class _TimeMix(torch.autograd.Function):
    """Backward, with g_i the gradient of output i: x gets sum_i mix_i g_i at its own position and
    sum_i (1 - mix_i) g_i from the next one (the first position's goes to ``last``); mix_i gets
    sum_{b,t} g_i (x - shifted). Autograd's own graph takes ~1.3x the passes."""

    @staticmethod
    def forward(ctx, x, last, *mixes):
        d, outs = _interpolate(x, token_shift(x, last), mixes)
        ctx.save_for_backward(d, *mixes)
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gs):
        d, *mixes = ctx.saved_tensors
        here = gs[0] * mixes[0].view(-1)
        for g, mix in zip(gs[1:], mixes[1:]):
            here.addcmul_(g, mix.view(-1))
        after = gs[0] - here  # sum_i (1 - mix_i) g_i
        for g in gs[1:]:
            after += g
        here[:, :-1] += after[:, 1:]
        g_mixes = [(g * d).sum((0, 1)).view_as(mix) for g, mix in zip(gs, mixes)]
        return here, after[:, 0], *g_mixes


def time_mix(x: Tensor, last: Tensor, *mixes: Tensor) -> tuple[Tensor, ...]:
    """The interpolations of x (B, T, C) or (B, C) with shift(x, last), one per mix (any shape
    that flattens to (C,))."""
    if x.dim() == 3 and torch.is_grad_enabled() and any(t.requires_grad for t in (x, last, *mixes)):
        return _TimeMix.apply(x, last, *mixes)
    return _interpolate(x, token_shift(x, last), mixes)[1]


def delta_mix(x: Tensor, last: Tensor, *mixes: Tensor) -> tuple[Tensor, ...]:
    """RWKV-7's convention for the same interpolation: x + mix_i (shift(x, last) - x), i.e.
    :func:`time_mix` with 1 - mix_i. Autograd's own backward (RWKV-7 trains through it as is)."""
    d = token_shift(x, last) - x
    return tuple(torch.addcmul(x, mix.view(-1), d) for mix in mixes)


def interpolate_token(start: Tensor, end: Tensor, mixes: Tensor) -> Tensor:
    """One token per stream: start, end (B, C), mixes (n, 1, C) stacked -> (n, B, C), row i
    ``start + mix_i (end - start)``: :func:`time_mix` is start = the shifted input (the state's
    last one), end = x; :func:`delta_mix` the reverse. Each row is those functions' arithmetic."""
    return torch.addcmul(start, mixes, end - start)
