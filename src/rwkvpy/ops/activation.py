"""RWKV's channel mixing after the token shift:

    out = sigmoid(xr W_r^T) * (relu(xk W_k^T)^2 W_v^T)

``squared_relu`` is its activation (inference, and training under autocast: autograd's own
backward); ``channel_mix_products`` is the whole of it as one autograd node with its backward
written out, for training.
"""

import torch
from torch import Tensor


def squared_relu(x: Tensor) -> Tensor:
    """relu(x)^2."""
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.square(torch.relu(x))
    return torch.relu(x).square_()


class _ChannelMixProducts(torch.autograd.Function):
    """Backward, with h = relu(xk W_k^T), s = sigmoid(xr W_r^T), c = h^2 W_v^T and out = s c:
    g_c = g s and g_r = g c s (1 - s) (r the receptance's logits); W_v gets g_c^T h^2; h gets
    2 h (g_c W_v) (where h > 0); then the two input products. relu and sigmoid run in place on
    their products' outputs, and autograd keeps one node instead of about nine."""

    @staticmethod
    def forward(ctx, xk: Tensor, xr: Tensor, w_k: Tensor, w_r: Tensor, w_v: Tensor) -> Tensor:
        B, T, C = xk.shape
        xk2, xr2 = xk.reshape(B * T, C), xr.reshape(B * T, C)
        h = torch.mm(xk2, w_k.t()).relu_()
        h2 = h * h
        c = torch.mm(h2, w_v.t())
        s = torch.mm(xr2, w_r.t()).sigmoid_()
        ctx.save_for_backward(xk2, xr2, w_k, w_r, w_v, h, h2, c, s)
        return (s * c).view(B, T, -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        xk2, xr2, w_k, w_r, w_v, h, h2, c, s = ctx.saved_tensors
        B, T, _ = g.shape
        g = g.reshape(B * T, -1)
        g_c = g * s
        g_r = torch.ops.aten.sigmoid_backward(g * c, s)
        g_h = torch.mm(g_c, w_v).mul_(h).mul_(2)
        return (torch.mm(g_h, w_k).view(B, T, -1), torch.mm(g_r, w_r).view(B, T, -1),
                torch.mm(g_h.t(), xk2), torch.mm(g_r.t(), xr2), torch.mm(g_c.t(), h2))


def channel_mix_products(xk: Tensor, xr: Tensor, w_k: Tensor, w_r: Tensor, w_v: Tensor) -> Tensor:
    """sigmoid(xr W_r^T) * (relu(xk W_k^T)^2 W_v^T) for xk, xr (B, T, C), plain weights of xk's
    dtype, outside autocast (the backward's operands would differ in dtype under it)."""
    return _ChannelMixProducts.apply(xk, xr, w_k, w_r, w_v)
