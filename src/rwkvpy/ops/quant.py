"""Weight-only int8 quantization, in one place: how a matrix is quantized, how a state dict
marks it, and how a quantized model is judged against the original.

    W ~ q * scale[:, None],  q int8 (out, in) with |q| <= 127,  scale fp32 (out,), one per output row

A quantized projection ``P`` stores ``q`` under its own key and the scales under ``P_scale``
(the buffer ``weight_scale`` of :class:`rwkvpy.ops.linear.Int8Linear`). The kernels that
multiply by ``q`` are in :mod:`rwkvpy.ops.plan`; ``rwkvpy quantize`` applies the gate below.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from ..errors import RwkvpyError

SCALE_SUFFIX = "_scale"


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: (q int8 (out, in), scale fp32 (out,)), |q| <= 127."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale



def is_quantized(sd: Iterable[str]) -> bool:
    """Whether a state dict (or its keys) holds int8 projections."""
    return any(k.endswith(SCALE_SUFFIX) for k in sd)


def quantize_state_dict(sd: Mapping[str, Tensor], projections: tuple[str, ...]) -> dict[str, Tensor]:
    """The keys ending in one of ``projections`` to int8 with their scales; the rest as is."""
    out = {}
    for key, t in sd.items():
        if key.endswith(projections):
            out[key], out[key + SCALE_SUFFIX] = quantize_int8(t)
        else:
            out[key] = t
    return out


@torch.no_grad()
def logit_agreement(reference: Tensor, quantized: Tensor) -> dict[str, float]:
    """How close a quantized model's logits (..., V) are to the reference's: the largest
    difference, mean KL(reference || quantized) in nats, and how often the top token agrees."""
    pr, pq = reference.float().log_softmax(-1), quantized.float().log_softmax(-1)
    return {"max_abs_diff": (reference - quantized).abs().max().item(),
            "kl": (pr.exp() * (pr - pq)).sum(-1).mean().item(),
            "top1": (reference.argmax(-1) == quantized.argmax(-1)).float().mean().item()}


def check_loss_increase(reference_loss: float, quantized_loss: float, max_increase_percent: float) -> float:
    """The quality gate: the relative loss increase, or an error if it passes the limit."""
    change = (quantized_loss - reference_loss) / reference_loss
    if change > max_increase_percent / 100:
        raise RwkvpyError(f"int8 raises the validation loss by {change:.2%}, more than "
                          f"--max-loss-increase {max_increase_percent}%; nothing written (--force writes it)")
    return change
