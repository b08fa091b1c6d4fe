"""The interface every model family implements, and what they share.

Generation, chat, evaluation, training, the benchmarks and the server talk to models only
through these calls; nothing outside ``models/`` asks which family it has:

    forward(tokens (B, T), state=None, *, last_only=False, return_state=True) -> (logits, state)
    step(tokens (B,), state) -> (logits (B, V), state)         one token per stream
    zero_state(B) -> state                                      a typed RecurrentState
    config, fingerprint, device, dtype

A family is one file here (its config, state, key names and shapes, modules, initialisers),
with its math in ``ops/``. It decides its own forms: inference kernels whenever no parameter
requires a gradient, training kernels when one does (:meth:`ModelBase.wants_grad`).
"""

from __future__ import annotations

import hashlib
import itertools
import sys
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, RwkvpyError
from ..ops.linear import Int8Linear, Linear
from ..ops.quant import SCALE_SUFFIX, is_quantized, quantize_state_dict

QUANTIZATIONS = (None, "int8")


def config_from_dict(cls, d: Mapping[str, Any]):
    """A family's config dataclass from its ``to_dict`` form; unknown keys are an error."""
    d = dict(d)
    arch = d.pop("arch", cls.arch)
    if arch != cls.arch:
        raise CheckpointError(f"config: arch is {arch!r}, expected {cls.arch!r}")
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise CheckpointError(f"config: unknown keys {unknown}")
    return cls(**d)


def check_positive_ints(cfg, names) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"config: {name} must be a positive integer, got {value!r}")


def finish(steps):
    """The result of a computation written as steps (``forward_in_steps``): its last item.
    (Results are yielded, not returned: torch.compile loses a nested generator's return value.)"""
    for item in steps:
        pass
    return item


def weights_fingerprint(sd: dict[str, Tensor], samples: int = 4096) -> str:
    """sha256 over names, shapes and up to ``samples`` evenly spaced values of each tensor
    (rounded to bf16, so fp32 and bf16 loads of one checkpoint agree)."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach()
        flat = t.reshape(-1)
        stride = max(1, flat.numel() // samples)
        values = flat[::stride][:samples].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(values.numpy().tobytes())
    return h.hexdigest()


class ModelBase(nn.Module):
    """What every family shares: device, fingerprint, grad policy, token checks, ``step``."""

    config: object

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def wants_grad(self) -> bool:
        """Whether this call builds a graph: grad mode on and some parameter requiring grad.
        A model from ``rwkvpy.load`` (no parameter requires grad) takes the inference kernels
        even outside ``torch.no_grad()``."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    @property
    def fingerprint(self) -> str:
        """Identifies the weights (sampled values, see :func:`weights_fingerprint`). It follows
        changes to them: recomputed whenever a tensor was replaced or modified in place (an
        optimizer step bumps the tensors' version counters)."""
        # The tensors themselves, not state_dict(): that converts planned weights back to their
        # checkpoint's dtype and layout (a copy of every weight, here on every new state).
        key = tuple((id(t), t._version) for t in itertools.chain(self.parameters(), self.buffers()))
        if getattr(self, "_fingerprint_key", None) != key:
            self._fingerprint = weights_fingerprint(self.state_dict())
            self._fingerprint_key = key
        return self._fingerprint

    def state_id(self) -> str:
        """The fingerprint for new states; empty in compiled code (hashing would break the graph)."""
        return "" if torch.compiler.is_compiling() else self.fingerprint

    def check_tokens(self, tokens) -> Tensor:
        tokens = torch.as_tensor(tokens, device=self.device)
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            raise RwkvpyError(f"tokens must have shape (B, T) with T >= 1, got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise RwkvpyError(f"tokens must be integers, got {tokens.dtype}")
        if torch.compiler.is_compiling():  # reading values would break the graph; inputs come from code
            return tokens.long()
        lo, hi = int(tokens.min()), int(tokens.max())
        vocab = self.config.vocab_size
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise RwkvpyError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        return tokens.long()

    def forward_in_steps(self, tokens, state=None, *, last_only: bool = False, return_state: bool = True):
        """``forward``'s computation as a generator of about one layer per ``next()``: None
        between layers, then ``forward``'s result as the last item. A server reads a long
        prompt between decode steps this way without making them wait for all of it. The same
        operations as ``forward``, so the same results to the bit. A family without layer
        steps computes everything at the first ``next()``."""
        yield self.forward(tokens, state, last_only=last_only, return_state=return_state)

    def run_segments(self, tokens, state, segment_len: int, last_only: bool, return_state: bool, segment):
        """What every recurrent family's ``forward_in_steps`` does around its math (a generator):
        check tokens and the state, then run ``segment(tokens (B, t), state, last_only,
        return_state, zero_in)`` (a generator yielding None between layers, then (logits,
        state)) on segments of ``segment_len`` tokens, the state carried between them (memory
        linear in T), and join the logits (only the last position's with ``last_only``).
        ``zero_in``: the segment starts from a new, all-zero state (a family may skip products
        with it)."""
        tokens = self.check_tokens(tokens)
        B, T = tokens.shape
        zero_in = state is None
        state = self.checked_state(state, B)
        logits = []
        for start in range(0, T, segment_len):
            end = min(T, start + segment_len)
            last = end == T
            for item in segment(tokens[:, start:end], state, last_only and last, return_state or not last, zero_in):
                if item is None:  # between layers
                    yield None
            out, state = item
            zero_in = False
            if not last_only or last:
                logits.append(out)
        yield (logits[0] if len(logits) == 1 else torch.cat(logits, 1)), (state if return_state else None)

    def step(self, tokens: Tensor, state=None):
        """One token per stream: tokens (B,) -> logits (B, V), new state."""
        logits, state = self.forward(self._step_tokens(tokens)[:, None], state)
        return logits[:, 0], state

    def _step_tokens(self, tokens) -> Tensor:
        tokens = torch.as_tensor(tokens, device=self.device)
        if tokens.dim() != 1:
            raise RwkvpyError(f"step takes tokens of shape (B,), got {tuple(tokens.shape)}")
        return tokens

    def step_inputs(self, tokens, state):
        """What a family's own ``step`` begins with: tokens (B,) checked as ``forward`` checks
        them, and the state (a zero one for None) checked against them and the model."""
        tokens = self.check_tokens(self._step_tokens(tokens)[:, None])[:, 0]
        return tokens, self.checked_state(state, tokens.shape[0])

    def checked_state(self, state, batch: int):
        """``state`` if it fits ``batch`` rows and this model's layers; a zero state for None."""
        if state is None:
            return self.zero_state(batch)
        if state.batch_size != batch or state.n_layer != self.config.n_layer:
            raise RwkvpyError(f"state has batch {state.batch_size} and {state.n_layer} layers; "
                              f"tokens have batch {batch} and the model {self.config.n_layer} layers")
        return state

    def _use_int8_projections(self) -> None:
        """Swap every projection for an int8 one of the same shape (weights loaded afterwards)."""
        for name, module in list(self.named_modules()):
            if isinstance(module, Linear):
                parent, _, attr = name.rpartition(".")
                int8 = Int8Linear(module.in_features, module.out_features, module.unbounded_input,
                                  device=module.weight.device)
                setattr(self.get_submodule(parent) if parent else self, attr, int8)

    @property
    def quantization(self) -> str | None:
        return "int8" if any(isinstance(m, Int8Linear) for m in self.modules()) else None

    def compile_step(self) -> None:
        """Route ``step`` through ``torch.compile`` from now on: the per-token small ops fuse
        into a few loops (measured: docs/benchmarks.md). Each new batch size compiles first
        (tens of seconds); needs a C++ compiler at run time, which is why this is opt-in. The
        compiled step is checked against the eager one before it is trusted
        (:class:`CheckedCompiledStep`)."""
        if "step" not in self.__dict__:  # the instance attribute shadows the method
            pin_inductor_vector_width()
            self.step = CheckedCompiledStep(self)


def kept(module: nn.Module, name: str, params: tuple[Tensor, ...], make: Callable[[], Any]):
    """``make()`` (tensors derived from ``params``, such as a layer's stacked mixes for decoding),
    computed once and kept on ``module``; computed again when any of ``params`` was changed in
    place (an optimizer step bumps its version counter) or has other memory (a new tensor, or
    the module moved to another device or dtype). Computed afresh inside torch.compile, which
    folds it into the graph."""
    if torch.compiler.is_compiling():
        return make()
    key = tuple((p.data_ptr(), p._version) for p in params)
    store = module.__dict__.setdefault("_kept", {})  # not an attribute of its own: none shadows a method
    cached = store.get(name)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, make())
        store[name] = cached
    return cached[1]


def pin_inductor_vector_width() -> None:
    """Name the vector width torch's inductor generates for (that of this process's CPU
    capability) in its config, which keys its cache: in torch 2.13 a graph cached under one
    capability (AVX-512's 16 floats a vector) and loaded under another
    (``ATEN_CPU_CAPABILITY=avx2``: 8) left half its outputs unwritten, and the reverse aborted
    the process (docs/design.md). A width the user set stays."""
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if config.cpp.simdlen is None:
        isa = pick_vec_isa()
        if isa:
            config.cpp.simdlen = isa.bit_width()


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |a - e| / max |e|; infinite where a has a NaN or an infinity e has not."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return float("inf")
    if not actual.is_floating_point():
        return 0.0 if torch.equal(actual, expected) else float("inf")
    a, e = actual.double(), expected.double()
    finite = e.isfinite()
    if not torch.equal(a.isfinite(), finite):
        return float("inf")
    if not finite.any():
        return 0.0
    return ((a - e)[finite].abs().max() / e[finite].abs().max().clamp_min(1e-30)).item()


class CheckedCompiledStep:
    """``model.step`` through ``torch.compile``, trusted for a shape of input only after its first
    call there gave the eager step's logits and state (within ``tolerance``, relative to each
    tensor's largest value). A compiled step that fails to build (no C++ compiler) or
    disagrees is dropped with one warning line, and the model decodes eagerly from then on.
    (Found necessary: a torch inductor cache filled on another CPU capability gave a compiled
    step that left half its outputs unwritten, docs/design.md.)"""

    def __init__(self, model: ModelBase, tolerance: float = 1e-3):
        self.tolerance = tolerance
        self.eager = type(model).step.__get__(model)
        self.compiled: Callable | None = torch.compile(self.eager, dynamic=False)
        self.trusted: set[tuple] = set()

    def __call__(self, tokens: Tensor, state=None):
        tokens = torch.as_tensor(tokens)
        if self.compiled is None:
            return self.eager(tokens, state)
        key = (tuple(tokens.shape), None if state is None else tuple(t.shape for t in state.tensors().values()))
        if key in self.trusted:
            return self.compiled(tokens, state)
        try:
            out = self.compiled(tokens, state)
        except RwkvpyError:  # the input's fault: the eager step says the same
            raise
        except Exception as e:  # noqa: BLE001 - any failure to build means: decode eagerly
            first_line = (str(e).strip().splitlines() or [""])[0][:120]
            return self._drop(f"torch.compile failed ({type(e).__name__}: {first_line})", tokens, state)
        ref = self.eager(tokens, state)  # the state is not modified: both read the same
        errors = [_relative_error(out[0], ref[0])]
        errors += [_relative_error(a, ref[1].tensors()[name]) for name, a in out[1].tensors().items()]
        worst = max(errors)
        if not worst <= self.tolerance:
            return self._drop(f"the compiled step disagrees with the eager one (relative error {worst:.3g})", tokens,
                              state, ref)
        self.trusted.add(key)
        return out

    def _drop(self, why: str, tokens: Tensor, state, ref=None):
        print(f"rwkvpy: warning: {why}; decoding without torch.compile", file=sys.stderr)
        self.compiled = None
        return ref if ref is not None else self.eager(tokens, state)


class LanguageModel(ModelBase):
    """A family built as ``emb -> blocks -> ln_out -> head`` (RWKV-4, RWKV-7, RetNet): those
    four modules, and where its dtypes and device are read."""

    def __init__(self, cfg, blocks: list[nn.Module]):
        super().__init__()
        self.config = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(blocks)
        self.ln_out = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.head = Linear(cfg.n_embd, cfg.vocab_size)

    @property
    def dtype(self) -> torch.dtype:
        """How the embedding and (unless quantized) the projections are stored."""
        return self.emb.weight.dtype

    @property
    def activation_dtype(self) -> torch.dtype:
        """fp32 for half or int8 weights (half activations and states overflow); fp64 for fp64."""
        return self.ln_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.emb.weight.device

    # A family with a one-token path defines ``_step_layer(i, block, x, state, new, carry) -> (x,
    # carry)``: layer i on x (B, C), writing its part of ``new``; ``carry`` is what one layer hands
    # the next (RWKV-7's v_first); its first block has ``ln0`` (the RWKV families). Without it
    # (RetNet), ``step`` is ``forward`` on one token.
    _step_layer: Callable | None = None

    def _state_dtype(self) -> torch.dtype:
        """The dtype of the layer tensors of this family's states: fp32, or fp64 in an fp64 model
        (half-precision models keep fp32 states)."""
        return torch.float64 if self.activation_dtype == torch.float64 else torch.float32

    def step(self, tokens: Tensor, state=None):
        """One token per stream: tokens (B,) -> logits (B, V), new state (``state`` is not
        modified). Through the family's ``_step_layer`` where it has one: the blocks' arithmetic
        on (B, C) tensors, each layer's state written straight into the new state (the sequence
        form's machinery costs more than the arithmetic here); a gradient takes ``forward``."""
        if type(self)._step_layer is None or self.wants_grad():
            return super().step(tokens, state)
        tokens, state = self.step_inputs(tokens, state)
        x = self.emb(tokens).to(self.activation_dtype)  # (B, C)
        dtype = self._state_dtype()
        new = type(state)(**{name: t + 1 if name == "pos" else torch.empty_like(t, dtype=dtype)
                             for name, t in state.tensors().items()}, model_id=state.model_id)
        carry = None
        for i, block in enumerate(self.blocks):
            if i == 0:
                x = block.ln0(x)
            x, carry = self._step_layer(i, block, x, state, new, carry)
        return self.head(self.ln_out(x)), new


def build_from_state_dict(make: Callable[[], ModelBase], sd: dict[str, Tensor], projections: tuple[str, ...],
                          is_matrix: Callable[[str, Tensor], bool], dtype=torch.float32, device="cpu",
                          quantize: str | None = None) -> ModelBase:
    """A model (``make()``, built on the meta device) that uses the given tensors, no copy when
    dtype and device already match.

    ``dtype`` is how the matrices (``is_matrix``: embedding, projections) are stored; everything
    else, and the activations, is fp32 (fp64 for an fp64 model): decays, norms and relu(k)^2
    lose too much or overflow in half precision. ``quantize="int8"`` stores ``projections`` as
    int8 with per-row scales; an int8 checkpoint loads as int8 either way.
    """
    if quantize not in QUANTIZATIONS:
        raise RwkvpyError(f"unknown quantization {quantize!r}; choose int8 or none")
    if quantize == "int8" and not is_quantized(sd):
        sd = quantize_state_dict(sd, projections)
    int8 = is_quantized(sd)
    vectors = torch.float64 if dtype == torch.float64 else torch.float32
    with torch.device("meta"):
        model = make()
        if int8:
            model._use_int8_projections()

    def place(key: str, t: Tensor) -> Tensor:
        if int8 and key.endswith(projections):
            return t.to(device)
        if key.endswith(SCALE_SUFFIX):
            return t.to(device, torch.float32)
        return t.to(device, dtype if is_matrix(key, t) else vectors)

    model.load_state_dict({k: place(k, v) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


def orthogonal(shape, gain: float, g: torch.Generator) -> Tensor:
    """A (rows, cols) matrix with orthonormal rows or columns, times gain (as nn.init.orthogonal_)."""
    rows, cols = shape
    a = torch.randn(max(rows, cols), min(rows, cols), generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))
    q = q if rows >= cols else q.T
    return (gain * q).float().contiguous()
