"""RWKV's channel-mix activation, relu(x)^2, with its backward written out."""

import torch
from torch import Tensor


class _SquaredReLU(torch.autograd.Function):
    # autograd's own graph (relu, pow) takes ~5 elementwise passes in backward; this takes two
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> Tensor:
        (r,) = ctx.saved_tensors
        return torch.mul(r, g).mul_(2)


def squared_relu(x: Tensor) -> Tensor:
    """relu(x)^2; its gradient 2 relu(x) g."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _SquaredReLU.apply(x)
    return torch.relu(x).square_()
