"""The kernel planner: which product computes ``y = x W^T`` fastest, and correctly, on this machine.

Like FFTW's planner and ATLAS's install-time tuning: for each way a projection can run (how its
weight is stored, how many rows of activations it meets, the device) the candidate kernels are
timed here, a few milliseconds each, and the fastest *correct* one is kept. CPUs disagree (an
AVX2 CPU has no bf16 arithmetic; two AVX-512 CPUs disagree on the fastest half-precision
product; torch 2.13's int8 weight kernel is wrong or crashes on AVX-512 unless in_features is a
multiple of 16), so nothing here is a constant measured on one machine:

- every candidate's answer is checked against a float64 product on random data of its shape
  and rows class before it may be chosen (:func:`verified`);
- a kernel that can crash the process (torch's int8 weight kernel) is first run in a
  subprocess, several times per rows class, and used only where that probe came back right;
- plans are cached per machine (CPU model and flags, cores, threads, torch version) in the
  user's cache directory, written atomically, and made anew when any of those change.

Vocabulary: a *storage* is the weight's dtype and memory layout, ``out_in`` (rows are output
channels, as checkpoints store them) or ``in_out`` (the transpose in memory, used through a
transposed view so the parameter keeps its shape); a *kernel* is a function
``(x, weight, scale) -> y`` from :data:`KERNELS`; a *rows class* is a range of rows
(:data:`ROW_CLASSES`). ``RWKVPY_KERNELS=safe`` turns planning off (plain ``F.linear``);
``RWKVPY_KERNELS=lean`` plans without the kernels that keep a second copy of a weight.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import RwkvpyError
from .quant import quantize_int8

# (first row, last row, the rows timed for the class)
ROW_CLASSES = ((1, 1, 1), (2, 16, 8), (17, 64, 48), (65, 512, 256), (513, None, 1024))
PLAN_VERSION = 4  # 2: the fbgemm fp16 candidate; 3: its margin; 4: oneDNN's packed product
_HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, **_HALF, "int8": torch.int8}


def rows_class(rows: int) -> int:
    """Index into :data:`ROW_CLASSES` of a call with ``rows`` rows."""
    return 0 if rows <= 1 else 1 if rows <= 16 else 2 if rows <= 64 else 3 if rows <= 512 else 4


def kernels_mode() -> str:
    """``planned`` (default), ``lean`` (``RWKVPY_KERNELS=lean``: planned, but no kernel that keeps
    a second copy of a weight: the least memory) or ``safe`` (plain ``F.linear`` everywhere)."""
    mode = os.environ.get("RWKVPY_KERNELS", "planned").strip().lower() or "planned"
    if mode not in ("planned", "lean", "safe"):
        raise RwkvpyError(f"RWKVPY_KERNELS={mode!r}: expected 'planned', 'lean' or 'safe'")
    return mode


# --- kernels -------------------------------------------------------------------------------------

def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1]


def half_input(x: Tensor, dtype: torch.dtype, unbounded: bool) -> tuple[Tensor, Tensor | None]:
    """x in a half type for a half-precision product. fp16 overflows at 65504, which inputs such
    as relu(k)^2 pass: an ``unbounded`` input is first divided by a power of two per row (exact),
    returned so the product can be scaled back."""
    if dtype != torch.float16 or not unbounded:
        return x.to(dtype), None
    scale = torch.exp2(torch.ceil(torch.log2(x.abs().amax(-1, keepdim=True).clamp_min(1e-30))))
    return (x / scale).to(dtype), scale


def linear(x: Tensor, w: Tensor, scale: Tensor | None = None, unbounded: bool = False) -> Tensor:
    """``F.linear`` in the weight's dtype (x cast to it and the result back)."""
    if w.dtype == x.dtype:
        return F.linear(x, w)
    xh, s = half_input(x, w.dtype, unbounded)
    y = F.linear(xh, w).to(x.dtype)
    return y if s is None else y * s


def linear_bf16(x: Tensor, w: Tensor, scale: Tensor | None = None, unbounded: bool = False) -> Tensor:
    """The product in bf16 for a bf16 checkpoint stored as fp16 (for decoding): the weight goes
    back to its own values in bf16, where CPUs with bf16 arithmetic multiply fastest."""
    return F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16)).to(x.dtype)


def upcast(x: Tensor, w: Tensor, scale: Tensor | None = None, unbounded: bool = False) -> Tensor:
    """The weight widened to x's dtype, then ``F.linear``: the safe product for half weights."""
    return F.linear(x, w.to(x.dtype))


def split_rows(x: Tensor, w: Tensor, scale: Tensor | None = None, unbounded: bool = False) -> Tensor:
    """W's output rows in two halves as one ``bmm``: where the library's matrix-vector product
    runs on one core, each half gets its own. W stored ``out_in``."""
    out, n_in = w.shape
    x_dtype, s = x.dtype, None
    if w.dtype != x_dtype:
        x, s = half_input(x, w.dtype, unbounded)
    half = out // 2
    halves = (w if out % 2 == 0 else w[: 2 * half]).view(2, half, n_in)
    rows = _rows(x)
    if rows == 1 and x.stride(-1) == 1:
        # x as (2, n_in, 1) with a column stride of n_in: bmm is ~3x slower with other strides
        y = torch.bmm(halves, x.as_strided((2, n_in, 1), (0, 1, n_in))).view(1, 2 * half)
    else:
        y = torch.bmm(halves, x.reshape(rows, n_in).t().expand(2, -1, -1))  # (2, half, rows)
        y = y.permute(2, 0, 1).reshape(rows, 2 * half)
    if out % 2:
        y = torch.cat([y, x.reshape(rows, n_in) @ w[2 * half:].t()], dim=1)
    y = y.view(*x.shape[:-1], out).to(x_dtype)
    return y if s is None else y * s


# torch marks its fp16-weight fbgemm product deprecated (it stays in 2.13, where it is the fastest
# half-precision product for few rows on x86); the planner checks and times it like any other.
warnings.filterwarnings("ignore", message=".*fbgemm_(linear|pack_gemm_matrix)_fp16.*deprecated")


def kept_on(w: Tensor, name: str, make: Callable[[Tensor], object]):
    """``make(w)``, made once per weight and kept on it as attribute ``name``; made again if the
    weight was changed in place since (``_version`` counts those writes). For the packed copies
    of the kernels in PREPARE."""
    kept = getattr(w, name, None)
    if kept is None or kept[0] != w._version:
        with torch.no_grad():
            kept = (w._version, make(w))
        setattr(w, name, kept)
    return kept[1]


def fp16_pack(w: Tensor) -> tuple[Tensor, Tensor]:
    """fbgemm's packed form of an fp16 weight (out, in) and a zero bias, kept on the weight."""
    return kept_on(w, "_rwkvpy_fp16_packed", lambda w: (torch.fbgemm_pack_gemm_matrix_fp16(w.float()),
                                                        w.new_zeros(w.shape[0], dtype=torch.float32)))


def fp16_packed(x: Tensor, w: Tensor, scale: Tensor | None = None, unbounded: bool = False) -> Tensor:
    """fbgemm's product of fp32 activations with fp16 weights, packed in its own blocked layout:
    the weights are read as fp16 (half fp32's bytes), the arithmetic is fp32 (no fp16 range for
    x to overflow). x86 builds only; elsewhere it refuses, and the planner passes it over."""
    # Traced, the packed handle is opaque: the product is an op of its own (eager calls skip the
    # custom op's dispatch, which would cost more than a small product).
    product = _fp16_packed_op if torch.compiler.is_compiling() else _fp16_product
    return product(x.float(), w).to(x.dtype)


def _fp16_product(x: Tensor, w: Tensor) -> Tensor:
    packed, bias = fp16_pack(w)
    return torch.fbgemm_linear_fp16_weight(x, packed, bias)


def _product_shape(x: Tensor, w: Tensor) -> Tensor:
    """What tracing needs of a packed product (a custom op): y's shape and type."""
    return x.new_empty(*x.shape[:-1], w.shape[0])


_fp16_packed_op = torch.library.custom_op("rwkvpy::fp16_packed", _fp16_product, mutates_args=())
_fp16_packed_op.register_fake(_product_shape)


def _has_onednn() -> bool:
    """Whether this build has oneDNN and the two ops :func:`onednn` calls (torch.compile's own)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_pack(w: Tensor) -> Tensor:
    """oneDNN's blocked form of a weight (out, in) for :func:`onednn`, kept on the weight. An
    fp16 weight is a faithful bf16 one (:func:`fp16_faithful`; the planner offers this kernel on
    no other fp16 weight): it goes back to bf16 exactly, the type oneDNN multiplies in."""

    def reorder(w: Tensor) -> Tensor:
        source = w.to(torch.bfloat16) if w.dtype == torch.float16 else w
        return torch.ops.mkldnn._reorder_linear_weight(source.contiguous(), None)

    return kept_on(w, "_rwkvpy_onednn_packed", reorder)


def onednn(x: Tensor, w: Tensor, scale: Tensor | None = None, unbounded: bool = False) -> Tensor:
    """oneDNN's product with the weight in its own blocked layout (as torch.compile's freezing
    packs it), x in the packed weight's type (fp32, or bf16 for half weights) and y back in
    x's. Where a few rows meet a large weight, MKL's ``F.linear`` here runs at a third of
    this (the 169M head at 8 rows: 26.0 ms against 9.0 as this machine's plan timed them;
    docs/benchmarks.md); for one row it is slower than the plain products, so the plan keeps
    both copies only where it wins."""
    product = _onednn_op if torch.compiler.is_compiling() else _onednn_product
    return product(x, w)


def _onednn_product(x: Tensor, w: Tensor) -> Tensor:
    packed = onednn_pack(w)
    y = torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype).contiguous(), packed, None, "none", [], "")
    return y.to(x.dtype)


_onednn_op = torch.library.custom_op("rwkvpy::onednn", _onednn_product, mutates_args=())
_onednn_op.register_fake(_product_shape)


def int8_dequantized(x: Tensor, q: Tensor, scale: Tensor, unbounded: bool = False) -> Tensor:
    """int8 weights widened to x's dtype, then ``F.linear``, then the per-row scales."""
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


def int8_bf16(x: Tensor, q: Tensor, scale: Tensor, unbounded: bool = False) -> Tensor:
    """int8 weights widened to bf16 (exactly: |q| <= 127 needs 7 bits), x rounded to bf16 as
    torch's int8 kernel rounds it (bf16 keeps fp32's range: relu(k)^2 needs no scaling), the
    product in bf16 with fp32 sums, then the per-row scales. On CPUs with bf16 arithmetic it
    is 2-2.5x the other int8 kernels from ~48 rows on (a prompt, a batch of streams); the
    conversion is per call, so no second copy of the weight is kept."""
    return linear_bf16(x, q) * scale


INT8_ALIGNMENT = 64  # bytes: torch 2.13's int8 weight kernel segfaults on a weight not so aligned


def int8_packed(x: Tensor, q: Tensor, scale: Tensor, unbounded: bool = False) -> Tensor:
    """torch's int8 weight kernel (x and the scales in bf16: it is slow with fp32 ones).
    Wrong or crashing on some CPUs for some shapes: used only where a subprocess probe passed.
    It also crashes on a weight whose address is not 64-byte aligned (a tensor memory-mapped
    from a safetensors file usually is not): ``plan_projections`` copies such weights, and a
    misaligned one reaching here takes the dequantizing product instead."""
    if q.data_ptr() % INT8_ALIGNMENT:
        return int8_dequantized(x, q, scale)
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    s = scale if scale.dtype == torch.bfloat16 else scale.to(torch.bfloat16)
    y = torch._weight_int8pack_mm(x2, q, s)
    return y.view(*x.shape[:-1], q.shape[0]).to(x.dtype)


KERNELS: dict[str, Callable] = {"linear": linear, "linear_bf16": linear_bf16, "upcast": upcast, "split": split_rows,
                                "fp16_packed": fp16_packed, "onednn": onednn, "int8_dequantized": int8_dequantized,
                                "int8_packed": int8_packed, "int8_bf16": int8_bf16}
PREPARE: dict[str, Callable] = {"fp16_packed": fp16_pack, "onednn": onednn_pack}  # work a kernel does once per weight, before timing


def safe_kernel(dtype: str) -> str:
    """The plain product for a storage dtype: always right, never the fastest."""
    return "int8_dequantized" if dtype == "int8" else "linear" if dtype in ("float32", "float64") else "upcast"


def kernel_for(kernels: tuple[Callable, ...], x: Tensor) -> Callable:
    """The planned kernel (one per rows class) for activations x (..., in)."""
    return kernels[rows_class(_rows(x))]

# Relative rounding of each kernel's arithmetic, for the check against float64: fp32 sums of a
# few thousand terms stay far inside 2^-16; a product with x (and the result, and the int8
# scales) rounded to bf16 moves each term by up to three roundings of 2^-9; fp16 by 2^-12 each.
_UNIT = {"float32": 2**-16, "float64": 2**-40, "bfloat16": 3 * 2**-9 + 2**-16, "float16": 3 * 2**-12 + 2**-20}


@dataclass(frozen=True)
class Candidate:
    """A storage (dtype, layout) and a kernel."""

    dtype: str
    layout: str  # "out_in" or "in_out"
    kernel: str

    @property
    def name(self) -> str:
        return f"{self.dtype}/{self.layout}/{self.kernel}"

    @staticmethod
    def parse(name: str) -> "Candidate":
        return Candidate(*name.split("/"))


def storages(kind: str) -> list[tuple[str, str]]:
    """The storages a weight of ``kind`` may take. ``bf16>fp16``: a bf16 matrix that converts to
    fp16 faithfully (:func:`fp16_faithful`, checked per matrix) may also be stored as fp16."""
    if kind == "int8":
        return [("int8", "out_in")]  # torch's int8 kernel reads (out, in)
    dtypes = {"fp32": ["float32"], "fp64": ["float64"], "bf16": ["bfloat16"], "fp16": ["float16"],
              "bf16>fp16": ["bfloat16", "float16"]}[kind]
    return [(d, layout) for d in dtypes for layout in ("out_in", "in_out")]


def candidates(kind: str, activation: str = "float32") -> list[Candidate]:
    out = []
    for dtype, layout in storages(kind):
        if dtype == "int8":
            out += [Candidate(dtype, layout, "int8_dequantized"), Candidate(dtype, layout, "int8_bf16")]
            if hasattr(torch, "_weight_int8pack_mm"):
                out.append(Candidate(dtype, layout, "int8_packed"))
            continue
        names = ["linear"] + (["upcast"] if dtype != activation else [])
        if kind == "bf16>fp16" and dtype == "float16":
            names.append("linear_bf16")
        if layout == "out_in":
            names.append("split")
            if dtype == "float16" and hasattr(torch, "fbgemm_linear_fp16_weight"):
                names.append("fp16_packed")
        if (dtype in ("float32", "bfloat16") or kind == "bf16>fp16") and _has_onednn():
            names.append("onednn")  # packs a copy of its own: any storage layout will do
        out += [Candidate(dtype, layout, n) for n in names]
    return out


def store(weight: Tensor, dtype: str, layout: str) -> Tensor:
    """``weight`` (out, in) in a storage: same shape, maybe another dtype or a transposed view."""
    w = weight.to(_DTYPES[dtype])
    if layout == "in_out":
        return w.t().contiguous().t()
    return w.contiguous()


def fp16_faithful(weight: Tensor) -> bool:
    """Whether a bf16 matrix may run as fp16 without losing anything bf16 keeps: no value beyond
    fp16's 65504, and each value converted within 2^-9 of its row's largest magnitude (bf16's own
    rounding). Values from 2^-17 to 65504 convert exactly; smaller ones (fp16 subnormals) move
    by at most 2^-25, which only rows of tiny values would notice."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2:
        return False
    for rows in weight.split(4096):  # in blocks: a vocabulary-sized head would double memory
        w = rows.float()
        row_max = w.abs().amax(1, keepdim=True)
        if row_max.max() >= 65504 or not ((rows.to(torch.float16).float() - w).abs() <= 2**-9 * row_max).all():
            return False
    return True


# --- checking and timing -------------------------------------------------------------------------

def sample_input(rows: int, n_in: int, unbounded: bool, g: torch.Generator, dtype=torch.float32) -> Tensor:
    x = torch.randn(rows, n_in, generator=g, dtype=dtype)
    if unbounded:  # as relu(k)^2 with k of a few units: values up to ~1e5, many zeros
        x = torch.relu(x * 100).square()
    return x


def reference(x: Tensor, w: Tensor, scale: Tensor | None, g: torch.Generator,
              outputs: int = 512) -> tuple[Tensor, Tensor, Tensor]:
    """(output indices, x W^T and |x| |W|^T at them, in float64) for :func:`verified`: all outputs
    of small weights, else a sample (the first and last 16, the rest at random), since a float64
    product of a vocabulary-sized head would cost more than every candidate's timing."""
    out = w.shape[0]
    if out <= outputs:
        idx = torch.arange(out)
    else:
        middle = torch.randperm(out - 32, generator=g)[: outputs - 32] + 16
        idx = torch.cat([torch.arange(16), middle.sort().values, torch.arange(out - 16, out)])
    w64 = w[idx].double() if scale is None else w[idx].double() * scale[idx].double()[:, None]
    x64 = x.double()
    return idx, x64 @ w64.t(), x64.abs() @ w64.abs().t()


def verified(kernel: Callable, x: Tensor, w: Tensor, scale: Tensor | None, unbounded: bool,
             unit: float, ref: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[bool, float]:
    """(whether y = kernel(x, w) is within ``unit`` rounding of the float64 product, the error).

    The bound is elementwise, ``|y - x W^T| <= unit |x| |W|^T``: it survives cancellation, and
    garbage, NaN or a wrong layout exceed it by orders of magnitude. Every output must be
    finite; values are compared at ``ref``'s outputs (:func:`reference`)."""
    idx, expected, absprod = ref if ref is not None else reference(x, w, scale, torch.Generator())
    with torch.no_grad():
        y = kernel(x, w, scale, unbounded)
    if y.shape != (*x.shape[:-1], w.shape[0]) or not torch.isfinite(y).all():
        return False, float("inf")
    excess = ((y[..., idx].double() - expected).abs() / (unit * absprod + 1e-30)).max().item()
    return excess <= 1.0, excess


def last_level_cache_bytes() -> int:
    """The largest CPU cache (sysfs), or 32 MiB when the system does not say."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20, "G": 2**30}[text[-1]] if text[-1] in "KMG"
                         else int(text))
        except (OSError, ValueError, KeyError):
            pass
    return max(sizes, default=32 * 2**20)


def time_call(fn: Callable[[], object], budget_s: float = 0.004, max_calls: int = 12) -> float:
    """Median seconds of ``fn()`` after one warm-up: at least 3 calls, then until ``budget_s``;
    a call slower than 20 ms is timed once (it cannot win by noise)."""
    with torch.no_grad():
        t0 = time.perf_counter()
        fn()
        if time.perf_counter() - t0 > 0.02:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        times: list[float] = []
        spent = 0.0
        while len(times) < 3 or (spent < budget_s and len(times) < max_calls):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times.append(dt)
            spent += dt
    return statistics.median(times)


# --- the int8 probe (a subprocess: the kernel can crash) -----------------------------------------

PROBE_ROWS = (1, 2, 3, 8, 16, 17, 48, 64, 65, 256, 513)
PROBE_REPEATS = 12  # one wrong answer in two is typical of a bad shape: 12 right ones rule it out


def probe_int8(shapes: list[tuple[int, int]], timeout_s: float = 120) -> dict[tuple[int, int], bool]:
    """Whether torch's int8 weight kernel is right for each (out, in), asked of subprocesses
    (never this process: on some CPUs it crashes). A shape whose probe crashed is wrong."""
    result: dict[tuple[int, int], bool] = {}
    pending = list(dict.fromkeys(shapes))
    if not hasattr(torch, "_weight_int8pack_mm"):
        return {s: False for s in pending}
    while pending:
        arg = ",".join(f"{o}x{i}" for o, i in pending)
        env = {**os.environ, "RWKVPY_KERNELS": "safe", "RWKVPY_PROBE_THREADS": str(torch.get_num_threads())}
        try:
            run = subprocess.run([sys.executable, "-m", "rwkvpy.ops.int8_probe", arg], env=env,
                                 capture_output=True, text=True, timeout=timeout_s)
            lines = run.stdout.split()
        except subprocess.TimeoutExpired as e:
            lines = (e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")).split()
        answered = {}
        for verdict, shape in zip(lines[::2], lines[1::2]):
            o, i = (int(v) for v in shape.split("x"))
            answered[(o, i)] = verdict == "ok"
        result.update(answered)
        rest = [s for s in pending if s not in answered]
        if rest:  # the first unanswered shape crashed (or hung) the probe
            result[rest[0]] = False
            rest = rest[1:]
        pending = rest
    return result


# --- the plan cache ------------------------------------------------------------------------------

@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, feature flags) of the CPU, from /proc/cpuinfo where there is one."""
    name, flags = platform.processor() or platform.machine(), frozenset()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return name, flags
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name in (platform.processor(), platform.machine()):
            name = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return name, flags


# Variables that cap the instruction sets of torch's own kernels (ATEN_CPU_CAPABILITY shows in
# the capability), MKL's and oneDNN's: a plan made under one cap may name a kernel another refuses.
ISA_VARIABLES = ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def machine_key() -> dict:
    """What a plan depends on: the CPU (model, flags), the instruction sets the libraries may
    use, cores, threads and torch."""
    name, flags = cpu_info()
    return {"cpu": name, "flags_sha256": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
            "capability": torch.backends.cpu.get_cpu_capability(),
            "isa_caps": {v: os.environ[v] for v in ISA_VARIABLES if os.environ.get(v)}, "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            # plans made with other rows classes or candidates are not this planner's
            "plan": f"{PLAN_VERSION} {ROW_CLASSES} {sorted(KERNELS)}"}


def cpu_flags() -> str:
    """The CPU features that decide kernels (for benchmark tables), as lscpu names them."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8",
              "asimd", "sve", "bf16", "i8mm")
    have = cpu_info()[1]
    return " ".join(f for f in wanted if f in have) or platform.machine()


def cache_path() -> Path:
    """``$RWKVPY_CACHE_DIR``, else ``$XDG_CACHE_HOME/rwkvpy``, else ``~/.cache/rwkvpy``."""
    root = os.environ.get("RWKVPY_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rwkvpy"
    return Path(root) / "kernels.json"


MACHINES_KEPT = 8  # plans of this many machine keys stay in the cache, the most recently written first


def _machines_on_disk(path: Path, warn: bool) -> list[dict]:
    """Every machine's plans in the cache file (newest first); a corrupt file reads as none,
    with one warning line (``warn``). A file of the single-machine layout reads as one."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        machines = data["machines"] if "machines" in data else [data]
        if not isinstance(machines, list) or not all(
                isinstance(m, dict) and isinstance(m.get("entries"), dict) and isinstance(m.get("int8_probe"), dict)
                for m in machines):
            raise ValueError("missing entries")
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        if warn:
            print(f"rwkvpy: warning: kernel plan cache {path} is unreadable; planning again", file=sys.stderr)
        return []
    return machines


def read_cache(path: Path | None = None, warn: bool = True) -> dict:
    """The cache's entries for this machine (its key: :func:`machine_key`); plans made under
    another key stay in the file for when that key comes back, and read as empty here."""
    key = machine_key()
    for m in _machines_on_disk(path or cache_path(), warn):
        if m.get("machine") == key:
            return {"entries": m["entries"], "int8_probe": m["int8_probe"]}
    return {"entries": {}, "int8_probe": {}}


def write_cache(data: dict, path: Path | None = None) -> None:
    """This machine's plans merged with what the file holds for it (another process may have
    planned other shapes meanwhile), written first; other machines' plans kept, up to
    MACHINES_KEPT. Atomic."""
    from ..io import atomic_write_text

    path = path or cache_path()
    key = machine_key()
    machines = _machines_on_disk(path, warn=False)
    mine = next((m for m in machines if m.get("machine") == key), {"entries": {}, "int8_probe": {}})
    merged = {"machine": key, "entries": {**mine["entries"], **data["entries"]},
              "int8_probe": {**mine["int8_probe"], **data["int8_probe"]}}
    others = [m for m in machines if m.get("machine") != key]
    try:
        atomic_write_text(path, json.dumps({"machines": [merged, *others][:MACHINES_KEPT]}, indent=1, sort_keys=True) + "\n")
    except OSError as e:
        print(f"rwkvpy: warning: cannot write kernel plan cache {path}: {e}", file=sys.stderr)


# --- planning ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Need:
    """One way a projection runs: weight kind, shape, and whether its input is unbounded."""

    kind: str  # fp32, fp64, bf16, bf16>fp16, fp16, int8
    out: int
    n_in: int
    unbounded: bool = False
    cold: bool = False  # the model's weights exceed the last-level cache: each call reads from memory

    @property
    def key(self) -> str:
        return (f"{self.kind}|{self.out}x{self.n_in}|{'unbounded' if self.unbounded else 'bounded'}|"
                f"{'memory' if self.cold else 'cache'}|cpu")


@dataclass(frozen=True)
class Choice:
    """A planned storage and one kernel per rows class."""

    dtype: str
    layout: str
    kernels: tuple[str, ...]


# A kernel that keeps a second copy of the weight (PREPARE) must be this much faster than one
# that does not: the copy costs the matrix's memory again, and one such kernel (fbgemm's, single
# threaded) timed faster alone than it ran in a 2-thread model (docs/benchmarks.md).
EXTRA_COPY_MARGIN = 1.25


def weighted(c: Candidate, seconds: float) -> float:
    """A candidate's time as the choice counts it (see EXTRA_COPY_MARGIN)."""
    return seconds * (EXTRA_COPY_MARGIN if c.kernel in PREPARE else 1.0)


CALL_FLOPS = 2e9  # rows timed per class are cut (down to the class's first) to about this much work
MAX_CALL_FLOPS = 8e9  # beyond this even at the class's first row, times are extrapolated from the class before


def plan_need(need: Need, int8_ok: bool, extra: dict[str, Callable] | None = None,
              seed: int = 0) -> dict:
    """Check and time every candidate of ``need`` for every rows class; the cache entry.

    One row is timed for every candidate; it decides the storage (decoding reads every weight
    once per token), so more rows are timed only for the kernels on that storage (others get
    None: they cannot be chosen). Large weights are timed on fewer rows within
    a class (CALL_FLOPS); where even the class's first row count is beyond MAX_CALL_FLOPS (a
    vocabulary-sized head at 513 rows) the time is the previous class's scaled by the rows, and
    the check runs on the first 4096 output rows. ``extra`` adds kernels by name (tests inject
    a fast, wrong one)."""
    g = torch.Generator().manual_seed(seed)
    kernels = {**KERNELS, **(extra or {})}
    w32 = torch.randn(need.out, need.n_in, generator=g) / need.n_in**0.5
    values = w32.to(torch.bfloat16) if need.kind.startswith("bf16") else w32
    q, q_scale = quantize_int8(w32)
    q_scale = q_scale.to(torch.bfloat16).float()  # the packed kernel's scales are bf16
    act = torch.float64 if need.kind == "fp64" else torch.float32
    cands = candidates(need.kind) + [Candidate(d, lay, name) for name in (extra or {})
                                     for d, lay in storages(need.kind)]
    timings: dict[str, list[float | None]] = {}
    rejected: dict[str, str] = {}
    live = []
    for c in cands:
        if c.kernel == "int8_packed" and not int8_ok:
            rejected[c.name] = "failed the subprocess probe on this machine"
        else:
            live.append(c)

    @functools.lru_cache(maxsize=1)  # candidates come grouped by storage: one conversion each
    def storage_of(c: Candidate) -> tuple[Tensor, Tensor | None]:
        if c.dtype == "int8":
            return store(q, c.dtype, c.layout), q_scale
        return store(values, c.dtype, c.layout), None

    def unit_of(c: Candidate) -> float:
        if act == torch.float64 and c.kernel in ("linear", "split", "upcast"):
            return _UNIT["float64"]
        return _UNIT[{"linear": c.dtype, "split": c.dtype, "upcast": "float32", "linear_bf16": "bfloat16",
                      "int8_packed": "bfloat16", "int8_bf16": "bfloat16", "fp16_packed": "float32",
                      "onednn": "float32" if c.dtype == "float32" else "bfloat16"}.get(c.kernel, "float32")]

    row_flops = 2 * need.out * need.n_in
    timed_rows: list[int] = []
    for i, (lo, _, rep) in enumerate(ROW_CLASSES):
        rows = min(rep, max(lo, int(CALL_FLOPS // row_flops)))
        extrapolated = i > 0 and lo * row_flops > MAX_CALL_FLOPS
        rows = lo if extrapolated else rows
        timed_rows.append(rows)
        x = sample_input(rows, need.n_in, need.unbounded, g, act)
        refs: dict[str, tuple] = {}
        if i == 1:  # the storage is decided: the fastest for one row (as choose() counts it)
            first = {c: weighted(c, timings[c.name][0]) for c in live}
            best = min(first, key=first.get)
            storage = (best.dtype, best.layout)
        for c in list(live):
            if i and (c.dtype, c.layout) != storage:
                timings[c.name].append(None)
                continue
            w, scale = storage_of(Candidate(c.dtype, c.layout, ""))
            if extrapolated:
                w, scale = w[:4096], None if scale is None else scale[:4096]
            if c.dtype not in refs:  # the same values in every layout
                refs[c.dtype] = reference(x, w, scale, g)
            try:
                ok, excess = verified(kernels[c.kernel], x, w, scale, need.unbounded, unit_of(c), refs[c.dtype])
            except RuntimeError as e:  # a kernel that refuses this shape or layout
                ok, excess = False, str(e).splitlines()[0][:80]
            if not ok:
                rejected[c.name] = f"wrong at {rows} rows (error {excess} x the rounding bound)"
                live.remove(c)
                timings.pop(c.name, None)
                continue
            if extrapolated:
                timings[c.name].append(_time_at(timings[c.name], i - 1) * rows / timed_rows[i - 1])
                continue
            # Decoding a model larger than the cache reads every weight from memory: time up to 64
            # rows (a batch of streams) so, on copies that together exceed the cache, in turn.
            copies = [w]
            if need.cold and rows <= 64:
                copies += [w.clone() for _ in range(-(-2 * last_level_cache_bytes() // (w.numel() * w.element_size())) - 1)]
            for copy in copies[1:]:
                PREPARE.get(c.kernel, lambda w: None)(copy)
            turn = itertools.cycle(copies)
            fn = kernels[c.kernel]
            timings.setdefault(c.name, []).append(time_call(lambda: fn(x, next(turn), scale, need.unbounded)))
    return {"timings": timings, "rejected": rejected}


def _time_at(times: list[float | None], i: int) -> float:
    return float("inf") if times[i] is None else times[i]


def choose(entry: dict, allowed_dtypes: set[str] | None = None, copies: bool = True) -> Choice:
    """From an entry's timings: the storage fastest for one row (decoding), then per rows class
    the fastest kernel on that storage (times :func:`weighted`). ``copies=False``: none of the
    kernels that keep a second copy of the weight (``RWKVPY_KERNELS=lean``)."""
    timings = {Candidate.parse(n): t for n, t in entry["timings"].items()
               if (allowed_dtypes is None or Candidate.parse(n).dtype in allowed_dtypes)
               and (copies or Candidate.parse(n).kernel not in PREPARE)}
    if not timings:
        raise RuntimeError("no correct kernel for this projection")

    def cost(c: Candidate, i: int, copies: frozenset[str] = frozenset()) -> float:
        # One row keeps the margin: packed kernels timed alone on one row ran slower in a model
        # (all of a 169M model's products through oneDNN: 0.8x at batch 1, docs/benchmarks.md).
        free = c.kernel in copies and i > 0
        return _time_at(timings[c], i) if free else weighted(c, _time_at(timings[c], i))

    best = min(timings, key=lambda c: cost(c, 0))
    on_storage = {c: t for c, t in timings.items() if (c.dtype, c.layout) == (best.dtype, best.layout)}

    def per_class(copies: frozenset[str]) -> tuple[str, ...]:
        kernels = []
        for i in range(len(ROW_CLASSES)):
            fastest = min(on_storage, key=lambda c: cost(c, i, copies))
            # nothing timed here (a restricted choice): the plain product, which is always right
            kernels.append(fastest.kernel if on_storage[fastest][i] is not None else safe_kernel(best.dtype))
        return tuple(kernels)

    kernels = per_class(frozenset())
    # A copy kept for one rows class costs nothing more in the others: no margin for it there
    # (but see cost(): one row keeps it).
    kernels = per_class(frozenset(k for k in kernels if k in PREPARE))
    return Choice(best.dtype, best.layout, kernels)


class Planner:
    """Plans many projections with one cache read, one int8 probe and one cache write."""

    def __init__(self, extra_kernels: dict[str, Callable] | None = None, use_cache: bool = True):
        self.extra = extra_kernels
        self.use_cache = use_cache and not extra_kernels
        self.data = read_cache() if self.use_cache else {"entries": {}, "int8_probe": {}}
        self.dirty = False

    def entries(self, needs: list[Need]) -> dict[Need, dict]:
        needs = list(dict.fromkeys(needs))
        todo = [n for n in needs if n.key not in self.data["entries"]]
        int8_shapes = [(n.out, n.n_in) for n in todo if n.kind == "int8"
                       and f"{n.out}x{n.n_in}" not in self.data["int8_probe"]]
        if int8_shapes:
            for (o, i), ok in probe_int8(int8_shapes).items():
                self.data["int8_probe"][f"{o}x{i}"] = ok
            self.dirty = True
        if todo:
            print(f"rwkvpy: timing kernels for {len(todo)} projection shape(s) on this machine (cached "
                  f"afterwards in {cache_path()})", file=sys.stderr)
        for n in todo:
            int8_ok = bool(self.data["int8_probe"].get(f"{n.out}x{n.n_in}", False))
            self.data["entries"][n.key] = plan_need(n, int8_ok, self.extra)
            self.dirty = True
        return {n: self.data["entries"][n.key] for n in needs}

    def save(self) -> None:
        if self.use_cache and self.dirty:
            write_cache(self.data)
            self.dirty = False


def describe(entry: dict, choice: Choice) -> list[str]:
    """Lines for ``rwkvpy info --plan``: every candidate's time per rows class, and rejections."""
    head = "  ".join(f"{lo}-{hi or '...'}" if hi != lo else f"{lo}" for lo, hi, _ in ROW_CLASSES)
    lines = [f"    {'candidate':36s} us per call, rows {head} ('-': not timed, another storage decodes faster)"]
    for name, times in sorted(entry["timings"].items(), key=lambda kv: kv[1][0]):
        c = Candidate.parse(name)
        mark = ["*" if (c.dtype, c.layout) == (choice.dtype, choice.layout) and c.kernel == k else " "
                for k in choice.kernels]
        lines.append(f"    {name:36s} " + "  ".join(f"{t * 1e6:9.1f}{m}" if t is not None else f"{'-':>9s}{m}"
                                                   for t, m in zip(times, mark)))
    for name, why in sorted(entry["rejected"].items()):
        lines.append(f"    {name:36s} rejected: {why}")
    return lines
