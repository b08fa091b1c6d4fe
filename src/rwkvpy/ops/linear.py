"""Projections ``y = x W^T`` for every way a weight is stored, each running the kernel that
the planner (:mod:`rwkvpy.ops.plan`) found fastest *and correct* on this machine.

Activations keep their dtype (fp32 in inference); only the weight is narrower:

    fp32 / fp64   W as is
    bf16 / fp16   W in half precision, x and y in fp32 (half activations overflow: relu(k)^2)
    int8          W = q * scale[:, None], q int8 (out, in), one fp32 scale per output channel

Until :func:`plan_projections` runs (``rwkvpy.load`` runs it unless ``RWKVPY_KERNELS=safe``),
and whenever a gradient is wanted, a projection is a plain ``F.linear`` (half weights widened,
int8 ones dequantized): always right, never the fastest.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import plan as planner


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


class Linear(nn.Linear):
    """``nn.Linear`` without bias (same parameter name and shape) that runs its planned kernels.

    ``unbounded_input`` marks a projection whose input can exceed fp16's range (relu(k)^2):
    fp16 products scale it first.
    """

    def __init__(self, in_features: int, out_features: int, unbounded_input: bool = False, **kwargs):
        super().__init__(in_features, out_features, bias=False, **kwargs)
        self.unbounded_input = unbounded_input
        self.kernels: tuple[Callable, ...] | None = None  # one per rows class, set by the planner
        self.checkpoint_dtype: torch.dtype | None = None  # set when the plan changed the dtype

    def forward(self, x: Tensor, channels_first: bool = False) -> Tensor:
        w = self.weight
        if channels_first and x.dim() == 3 and x.dtype == w.dtype:
            return project_channels_first(x, w)
        if self.kernels is None or (w.requires_grad and torch.is_grad_enabled()):
            return planner.upcast(x, w)
        return planner.kernel_for(self.kernels, x)(x, w, None, self.unbounded_input)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The weight as the checkpoint had it, whatever storage the plan gave it (a transposed
        layout, or fp16 for a bf16 matrix that converts faithfully)."""
        w = self.weight if keep_vars else self.weight.detach()
        if self.checkpoint_dtype is not None and w.dtype != self.checkpoint_dtype:
            w = w.to(self.checkpoint_dtype)
        destination[prefix + "weight"] = w if w.is_contiguous() else w.contiguous()


class Int8Linear(nn.Module):
    """Weight-only int8 projection: buffers ``weight`` (int8, out x in) and ``weight_scale`` (out)."""

    def __init__(self, in_features: int, out_features: int, unbounded_input: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.unbounded_input = unbounded_input
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.kernels: tuple[Callable, ...] | None = None
        self._scales: tuple[Tensor, Tensor, Tensor] | None = None  # (source, for packed, for dequantized)

    def forward(self, x: Tensor, channels_first: bool = False) -> Tensor:
        """``channels_first`` (a layout preference) is not taken: int8 weights do not train."""
        if self.kernels is None:
            return planner.int8_dequantized(x, self.weight, self.weight_scale)
        if self._scales is None or self._scales[0] is not self.weight_scale:  # new or reloaded scales
            s = self.weight_scale
            self._scales = (s, s.to(torch.bfloat16), s.to(x.dtype))
        kernel = planner.kernel_for(self.kernels, x)
        return kernel(x, self.weight, self._scales[1 if kernel is planner.int8_packed else 2])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _kind(module: nn.Module) -> str:
    dtype = module.weight.dtype
    if dtype == torch.bfloat16:
        return "bf16>fp16" if planner.fp16_faithful(module.weight) else "bf16"
    return {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.int8: "int8"}[dtype]


@torch.no_grad()
def plan_projections(model: nn.Module, planner_: planner.Planner | None = None,
                     report: list[str] | None = None) -> None:
    """Give every projection of ``model`` its planned storage and kernels (CPU; other devices
    keep ``F.linear``). Plans come from the per-machine cache or are measured now (a few
    milliseconds per candidate). ``report`` collects lines for ``--plan``."""
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, (Linear, Int8Linear))
               and m.weight.device.type == "cpu"]
    if not modules:
        return
    p = planner_ or planner.Planner()
    cold = sum(m.weight.numel() * m.weight.element_size() for _, m in modules) > planner.last_level_cache_bytes()
    needs = {name: planner.Need(_kind(m), m.out_features, m.in_features, m.unbounded_input, cold)
             for name, m in modules}
    entries = p.entries(list(needs.values()))
    p.save()
    seen = set()
    for name, m in modules:
        need = needs[name]
        entry = entries[need]
        choice = planner.choose(entry, copies=planner.kernels_mode() != "lean")
        if report is not None and need not in seen:
            seen.add(need)
            report.append(f"  {need.kind} {need.out}x{need.n_in}{' (unbounded input)' if need.unbounded else ''}: "
                          f"{choice.dtype} {choice.layout}, kernels by rows class {', '.join(choice.kernels)}")
            report.extend(planner.describe(entry, choice))
        if isinstance(m, Linear):
            w = planner.store(m.weight.detach(), choice.dtype, choice.layout)
            if w.dtype != m.weight.dtype or w.stride() != m.weight.stride():
                m.checkpoint_dtype = m.checkpoint_dtype or m.weight.dtype
                m.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
        elif "int8_packed" in choice.kernels and m.weight.data_ptr() % planner.INT8_ALIGNMENT:
            m.weight = m.weight.clone()  # the int8 kernel needs an aligned weight (a mapped file's is not)
        m.kernels = tuple(planner.KERNELS[k] for k in choice.kernels)
        for k in dict.fromkeys(choice.kernels):
            if k in planner.PREPARE:  # now, not at the first token
                planner.PREPARE[k](m.weight)

