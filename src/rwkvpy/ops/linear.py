"""Projections ``y = x W^T`` for every way a weight is stored, with the CPU kernel that was
measured fastest for each (docs/benchmarks.md, ``benchmarks/bench_kernels.py``).

Activations keep their dtype (fp32 in inference); only the weight is narrower:

    fp32 / fp64   W as is
    bf16 / fp16   W in half precision, x and y in fp32 (half activations overflow: relu(k)^2)
    int8          W = q * scale[:, None], q int8 (out, in), one fp32 scale per output channel

Why the kernels differ from a plain ``F.linear`` on a CPU: a matrix-vector product is bound by
reading the weight, and MKL's fp32 GEMV runs on one core. Splitting the rows into two halves
and handing them to ``bmm`` (one core each) reads the weight ~1.7x faster, and stays ahead up
to 64 rows. Without native bf16 arithmetic (AVX2 only), half-precision products are fast only as
a matrix-vector product; for more rows converting the weight to fp32 first is faster.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SPLIT_MAX_ROWS = 64  # fp32 rows up to which the split product beats F.linear (CPU)
SPLIT_MIN_NUMEL = 1 << 18  # below this (1 MiB in fp32) the weight is in cache: F.linear is cheaper
HALF_GEMV_MAX_ROWS = 1  # half-precision rows up to which a half product beats upcasting (CPU, AVX2)
INT8_GEMV_MAX_ROWS = 16  # rows up to which torch's int8 weight kernel beats dequantizing (CPU)
HALF = (torch.bfloat16, torch.float16)


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), so bf16 GEMMs are fast."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1]


def _split_rows_product(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., in) @ W^T with W's rows in two halves computed as one ``bmm`` (one core each)."""
    out, n_in = weight.shape
    half = out // 2
    halves = (weight if out % 2 == 0 else weight[: 2 * half]).view(2, half, n_in)
    rows = _rows(x)
    if rows == 1 and x.stride(-1) == 1:  # decoding: (2, half, 1) is already in output order
        # x as (2, n_in, 1) with a column stride of n_in: bmm is ~3x slower with other strides
        y = torch.bmm(halves, x.as_strided((2, n_in, 1), (0, 1, n_in))).view(1, 2 * half)
    else:
        y = torch.bmm(halves, x.reshape(rows, n_in).t().expand(2, -1, -1))  # (2, half, rows)
        y = y.permute(2, 0, 1).reshape(rows, 2 * half)
    if out % 2:
        y = torch.cat([y, x.reshape(rows, n_in) @ weight[2 * half:].t()], dim=1)
    return y.view(*x.shape[:-1], out)


def project(x: Tensor, weight: Tensor, scale: Tensor | None = None,
            scale_bf16: Tensor | None = None) -> Tensor:
    """``x @ weight.T`` (times ``scale`` per output channel for int8 weights), in x's dtype.

    ``scale_bf16`` is the scale already in bf16, as the int8 kernel wants it (saves a cast).
    """
    if scale is not None:
        return _project_int8(x, weight, scale, scale_bf16)
    if weight.dtype == x.dtype:
        if (x.device.type == "cpu" and weight.numel() >= SPLIT_MIN_NUMEL and _rows(x) <= SPLIT_MAX_ROWS
                and not (torch.is_grad_enabled() and weight.requires_grad)):
            return _split_rows_product(x, weight)
        return F.linear(x, weight)
    if x.device.type != "cpu" or _rows(x) <= HALF_GEMV_MAX_ROWS or (
            weight.dtype == torch.bfloat16 and native_bf16()):
        return F.linear(x.to(weight.dtype), weight).to(x.dtype)
    return F.linear(x, weight.to(x.dtype))


def _product_channels_first(x2: Tensor, weight: Tensor, B: int, T: int) -> Tensor:
    return torch.mm(weight, x2.t()).view(-1, B, T).permute(1, 2, 0)


class _ProjectChannelsFirst(torch.autograd.Function):
    """One autograd node where reshape, transpose, mm, view and permute would make five."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        B, T, n_in = x.shape
        x2 = x.reshape(B * T, n_in)
        ctx.save_for_backward(x2, weight)
        return _product_channels_first(x2, weight, B, T)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        x2, weight = ctx.saved_tensors
        B, T, n_out = g.shape
        g2 = g.permute(2, 0, 1).reshape(n_out, B * T)  # a view when g is channels first
        gx = torch.mm(g2.t(), weight).view(B, T, -1) if ctx.needs_input_grad[0] else None
        gw = torch.mm(g2, x2) if ctx.needs_input_grad[1] else None
        return gx, gw


def project_channels_first(x: Tensor, weight: Tensor) -> Tensor:
    """x (B, T, in) -> x W^T as (B, T, out) whose memory is (out, B, T), for sums over time.

    The product W x^T writes that layout at no extra cost, where transposing afterwards is a
    strided copy (~7x a plain one here). The gradient of x comes back contiguous.
    """
    if (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and not torch.is_autocast_enabled(x.device.type)):  # autocast: dtypes differ in backward
        return _ProjectChannelsFirst.apply(x, weight)
    B, T, n_in = x.shape
    return _product_channels_first(x.reshape(B * T, n_in), weight, B, T)


def _project_int8(x: Tensor, q: Tensor, scale: Tensor, scale_bf16: Tensor | None) -> Tensor:
    # torch's kernel crashes (torch 2.13, AVX2) for 2+ rows when in_features is not a multiple of 8
    if (x.device.type == "cpu" and _rows(x) <= INT8_GEMV_MAX_ROWS and q.shape[1] % 8 == 0
            and hasattr(torch, "_weight_int8pack_mm")):
        # It reads int8 weights fast only with bf16 activations (fp32 ones: ~6x slower).
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(x2, q, scale.to(torch.bfloat16) if scale_bf16 is None else scale_bf16)
        return y.view(*x.shape[:-1], q.shape[0]).to(x.dtype)
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: (q int8 (out, in), scale fp32 (out,)), |q| <= 127."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Linear(nn.Linear):
    """``nn.Linear`` without bias (same parameter name and shape) that uses :func:`project`."""

    def __init__(self, in_features: int, out_features: int, **kwargs):
        super().__init__(in_features, out_features, bias=False, **kwargs)

    def forward(self, x: Tensor, channels_first: bool = False) -> Tensor:
        if channels_first and x.dim() == 3 and x.dtype == self.weight.dtype:
            return project_channels_first(x, self.weight)
        return project(x, self.weight)


class Int8Linear(nn.Module):
    """Weight-only int8 projection: buffers ``weight`` (int8, out x in) and ``weight_scale`` (out)."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self._scale_source: Tensor | None = None
        self._scale_bf16: Tensor | None = None  # torch's int8 kernel wants the activations' dtype

    def forward(self, x: Tensor, channels_first: bool = False) -> Tensor:
        """``channels_first`` (a layout preference) is not taken: int8 weights do not train."""
        if self._scale_source is not self.weight_scale:  # new or reloaded scales
            self._scale_source, self._scale_bf16 = self.weight_scale, self.weight_scale.to(torch.bfloat16)
        return project(x, self.weight, self.weight_scale, self._scale_bf16)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"
