"""RWKV-4 (arXiv 2305.13048): one set of weights, run in parallel or recurrent form.

Parameter names and shapes are the official ones (BlinkDL RWKV-LM), so ``state_dict()``
*is* an official checkpoint. Per block (``x`` is the residual stream, C = n_embd,
A = dim_att, F = dim_ffn):

    time mixing     xx = ln1(x);  xk, xv, xr = time_mix(xx, shift(xx), time_mix_k / v / r)
                    r = sigmoid(W_r xr);  k = W_k xk;  v = W_v xv
                    x = x + W_o (r * wkv(w = -exp(time_decay), u = time_first, k, v))
    channel mixing  xx = ln2(x);  xk, xr = time_mix(xx, shift(xx), time_mix_k / r)
                    x = x + sigmoid(W_r xr) * W_v relu(W_k xk)^2

with ``ln0`` applied to the embedding before block 0 and ``head(ln_out(x))`` at the end.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import RwkvpyError
from ..ops.activation import channel_mix_products, squared_relu
from ..ops.linear import Int8Linear, Linear, quantize_int8
from ..ops.shift import time_mix
from ..ops.wkv import WkvState, wkv_chunked, wkv_matmul, wkv_token
from .config import PROJECTIONS, SCALE_SUFFIX, RWKV4Config, is_quantized
from .state import RWKV4State

# The parallel WKV form and its chunk length, as measured (docs/benchmarks.md). Training: the
# matrix-product form with its written-out backward, fed channels first (4 x 128 steps 76.5 ->
# ~46 ms, 6 x 512 1991 -> ~1510 ms; chunks of 16 fastest of 8/16/32/64). Inference on a CPU: the
# same form with chunks of 32 (12 x 768, 1024-token prefill: 750 tok/s against 650 for the
# chunked form, and 724/728 for chunks of 64/16; 8 prompts of 64: 1.27x; one prompt of <= 64
# tokens: 3% slower). Compiled, or on a GPU (measured only with it): the chunked form, whose work
# within chunks grows with chunk_len while its number of small ops shrinks; on a CPU arithmetic
# dominates (4 was fastest), on a GPU kernel launches do (64).
CHUNK_LEN_CPU = 4
CHUNK_LEN_ACCELERATOR = 64
TRAIN_CHUNK_LEN = 16
PREFILL_CHUNK_LEN_CPU = 32
QUANTIZATIONS = (None, "int8")


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKV4Config):
        super().__init__()
        C, A = cfg.n_embd, cfg.dim_att
        self.time_decay = nn.Parameter(torch.zeros(A))
        self.time_first = nn.Parameter(torch.zeros(A))
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = Linear(C, A)
        self.value = Linear(C, A)
        self.receptance = Linear(C, A)
        self.output = Linear(A, C)

    def forward(self, xx: Tensor, last_x: Tensor, s: WkvState, form: WkvForm | None):
        """xx (B, T, C), or (B, C) for one token -> (output like xx, last input, WKV state)."""
        xk, xv, xr = time_mix(xx, last_x, self.time_mix_k, self.time_mix_v, self.time_mix_r)
        cf = form is not None and form.channels_first
        k, v = self.key(xk, channels_first=cf), self.value(xv, channels_first=cf)
        r = torch.sigmoid(self.receptance(xr, channels_first=cf))
        # The WKV sums run in the activations' dtype (fp32 at least): exp(k) and the state
        # overflow half precision, which autocast would otherwise give k and v.
        if k.dtype != xx.dtype:
            k, v = k.to(xx.dtype), v.to(xx.dtype)
        w = -torch.exp(self.time_decay.to(xx.dtype))
        u = self.time_first.to(xx.dtype)
        if form is None:
            y, s = wkv_token(w, u, k, v, s)
        else:
            y, s = form.run(w, u, k, v, s)
        return self.output(r * y), _last(xx), s


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKV4Config):
        super().__init__()
        C, F_ = cfg.n_embd, cfg.dim_ffn
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = Linear(C, F_)
        self.receptance = Linear(C, C)
        self.value = Linear(F_, C)

    def forward(self, xx: Tensor, last_x: Tensor):
        xk, xr = time_mix(xx, last_x, self.time_mix_k, self.time_mix_r)
        if self._fused_training(xk):
            w = (self.key.weight, self.receptance.weight, self.value.weight)
            return channel_mix_products(xk, xr, *w), _last(xx)
        k = squared_relu(self.key(xk))
        r = torch.sigmoid(self.receptance(xr))
        return r * self.value(k), _last(xx)

    def _fused_training(self, xk: Tensor) -> bool:
        projections = (self.key, self.receptance, self.value)
        return (torch.is_grad_enabled() and xk.dim() == 3 and not torch.is_autocast_enabled(xk.device.type)
                and all(type(p) is Linear and p.weight.dtype == xk.dtype for p in projections))


def _last(xx: Tensor) -> Tensor:
    return xx if xx.dim() == 2 else xx[:, -1]


class Block(nn.Module):
    def __init__(self, cfg: RWKV4Config, layer_id: int):
        super().__init__()
        eps = cfg.layer_norm_eps
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd, eps=eps)
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=eps)
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=eps)
        self.att = TimeMix(cfg)
        self.ffn = ChannelMix(cfg)


class RWKV4(nn.Module):
    """The RWKV-4 language model. ``forward`` takes any length; ``step`` is one token."""

    def __init__(self, cfg: RWKV4Config):
        super().__init__()
        self.config = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.head = Linear(cfg.n_embd, cfg.vocab_size)
        self.chunk_len: int | None = None  # None: the measured default for the device

    @property
    def dtype(self) -> torch.dtype:
        """How the embedding and (unless quantized) the projections are stored."""
        return self.emb.weight.dtype

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype of activations: fp32 for half or int8 weights (half activations overflow)."""
        return self.ln_out.weight.dtype

    @property
    def quantization(self) -> str | None:
        return "int8" if isinstance(self.head, Int8Linear) else None

    def _use_int8_projections(self) -> None:
        """Swap every projection for an int8 one of the same shape (weights loaded afterwards)."""
        for name, module in list(self.named_modules()):
            if isinstance(module, Linear):
                parent, _, attr = name.rpartition(".")
                int8 = Int8Linear(module.in_features, module.out_features, device=module.weight.device)
                setattr(self.get_submodule(parent) if parent else self, attr, int8)

    @property
    def device(self) -> torch.device:
        return self.emb.weight.device

    def zero_state(self, batch_size: int = 1) -> RWKV4State:
        c = self.config
        # Compiled code (training) never saves states; hashing weights there would break the graph.
        model_id = "" if torch.compiler.is_compiling() else self.fingerprint
        return RWKV4State.zeros(c.n_layer, batch_size, c.n_embd, c.dim_att, device=self.device,
                                model_id=model_id)

    @property
    def fingerprint(self) -> str:
        """Identifies the weights (sampled, rounded to bf16 so fp32/bf16 loads agree).

        Computed once, when first needed; it does not follow later changes to the weights.
        """
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = weights_fingerprint(self.state_dict())
        return self._fingerprint

    def forward(
        self, tokens: Tensor, state: RWKV4State | None = None, *, last_only: bool = False,
        return_state: bool = True,
    ) -> tuple[Tensor, RWKV4State | None]:
        """tokens (B, T) -> logits (B, T, V) (or (B, 1, V) with ``last_only``), new state.

        ``state`` is not modified. Each row of the batch is an independent sequence.
        ``return_state=False`` returns None for the state and skips computing it where it can
        (training on windows).
        """
        tokens = self._check_tokens(tokens)
        B = tokens.shape[0]
        if state is None:
            state = self.zero_state(B)
        elif state.batch_size != B or state.n_layer != self.config.n_layer:
            raise RwkvpyError(
                f"state has batch {state.batch_size} and {state.n_layer} layers; "
                f"tokens have batch {B} and the model {self.config.n_layer} layers"
            )
        one_token = tokens.shape[1] == 1  # decoding: (B, C) activations, fewer ops per token
        wkv = None if one_token else parallel_wkv(torch.is_grad_enabled(), self.device.type, self.chunk_len,
                                                  final_state=return_state)
        x = self.emb(tokens[:, 0] if one_token else tokens).to(self.activation_dtype)
        new = {name: [] for name in ("att_x", "ffn_x", "num", "den", "max")}
        for i, block in enumerate(self.blocks):
            if i == 0:
                x = block.ln0(x)
            out, att_x, s = block.att(block.ln1(x), state.att_x[i], state.layer_wkv(i), wkv)
            x = x + out
            out, ffn_x = block.ffn(block.ln2(x), state.ffn_x[i])
            x = x + out
            if return_state:
                for name, value in zip(new, (att_x, ffn_x, *s)):
                    new[name].append(value if value.dtype == torch.float32 else value.float())
        if one_token:
            x = x.unsqueeze(1)
        elif last_only:
            x = x[:, -1:]
        logits = self.head(self.ln_out(x))
        if not return_state:
            return logits, None
        layers = {k: torch.stack(v) for k, v in new.items()}
        return logits, RWKV4State(**layers, pos=state.pos + tokens.shape[1], model_id=state.model_id)

    def step(self, tokens: Tensor, state: RWKV4State | None = None) -> tuple[Tensor, RWKV4State]:
        """One token per stream: tokens (B,) -> logits (B, V), new state."""
        tokens = torch.as_tensor(tokens)
        if tokens.dim() != 1:
            raise RwkvpyError(f"step takes tokens of shape (B,), got {tuple(tokens.shape)}")
        logits, state = self.forward(tokens[:, None], state)
        return logits[:, 0], state

    def compile_step(self) -> None:
        """Route ``step`` through ``torch.compile`` from now on: the per-token small ops fuse into a
        few loops. fp32 decoding on 2 CPU cores measured ~1.4x the eager tokens/s
        (docs/benchmarks.md). Each new batch size compiles first (~30 s for 12 x 768); needs
        a C++ compiler at run time, which is why this is opt-in."""
        if "step" not in self.__dict__:  # the instance attribute shadows the method
            self.step = torch.compile(RWKV4.step.__get__(self), dynamic=False)

    def _check_tokens(self, tokens) -> Tensor:
        tokens = torch.as_tensor(tokens, device=self.device)
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            raise RwkvpyError(f"tokens must have shape (B, T) with T >= 1, got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise RwkvpyError(f"tokens must be integers, got {tokens.dtype}")
        if torch.compiler.is_compiling():  # reading values would break the graph; inputs come from code
            return tokens.long()
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise RwkvpyError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        return tokens.long()

    def save(self, path) -> None:
        """Write rwkvpy's own format (safetensors + JSON config), atomically."""
        from ..checkpoint.native import save_native

        save_native(self.config, self.state_dict(), path)


class WkvForm(NamedTuple):
    """The WKV form for sequences, ``run(w, u, k, v, state) -> (out, state)``, and whether it is
    fastest with k, v (and so r, y) stored channels first (memory (C, B, T))."""

    run: Callable
    channels_first: bool


def parallel_wkv(training: bool, device_type: str, chunk_len: int | None = None,
                 final_state: bool = True) -> WkvForm:
    # Compiled, the chunked form: safe for any keys without the matmul form's data-dependent
    # fallback, and its elementwise ops fuse (4 x 128: 8% faster than the compiled matmul form;
    # 6 x 512: 10% slower, docs/benchmarks.md).
    if not torch.compiler.is_compiling() and (training or device_type == "cpu"):
        default = TRAIN_CHUNK_LEN if training else PREFILL_CHUNK_LEN_CPU
        run = functools.partial(wkv_matmul, chunk_len=chunk_len or default, final_state=final_state)
        return WkvForm(run, True)
    default = CHUNK_LEN_CPU if device_type == "cpu" else CHUNK_LEN_ACCELERATOR
    return WkvForm(functools.partial(wkv_chunked, chunk_len=chunk_len or default), False)


def weights_fingerprint(sd: dict[str, Tensor], samples: int = 4096) -> str:
    """sha256 over names, shapes and up to ``samples`` evenly spaced values of each tensor."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach()
        flat = t.reshape(-1)
        stride = max(1, flat.numel() // samples)
        values = flat[::stride][:samples].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(values.numpy().tobytes())
    return h.hexdigest()


def random_state_dict(cfg: RWKV4Config, seed: int = 0, dtype=torch.float32) -> dict[str, Tensor]:
    """Random weights in official names and shapes, with the value ranges of trained models.

    Decays span from almost none to very fast (time_decay in [-6, 6] gives w from -2.5e-3 to
    -400), bonuses and mixes vary per channel, and projections keep activations O(1), so the
    forms are exercised where the numerics are hard.
    """
    g = torch.Generator().manual_seed(seed)
    C, A, F_, V = cfg.n_embd, cfg.dim_att, cfg.dim_ffn, cfg.vocab_size

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    sd = {"emb.weight": randn(V, C)}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        if i == 0:
            sd[p + "ln0.weight"], sd[p + "ln0.bias"] = 1 + randn(C, std=0.1), randn(C, std=0.1)
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + randn(C, std=0.1), randn(C, std=0.1)
        sd[p + "att.time_decay"] = torch.linspace(-6, 6, A)[torch.randperm(A, generator=g)]
        sd[p + "att.time_first"] = randn(A)
        for m in ("k", "v", "r"):
            sd[p + f"att.time_mix_{m}"] = rand(1, 1, C)
        sd[p + "att.key.weight"] = randn(A, C, std=1.5 / math.sqrt(C))
        sd[p + "att.value.weight"] = randn(A, C, std=1 / math.sqrt(C))
        sd[p + "att.receptance.weight"] = randn(A, C, std=1 / math.sqrt(C))
        sd[p + "att.output.weight"] = randn(C, A, std=1 / math.sqrt(A))
        for m in ("k", "r"):
            sd[p + f"ffn.time_mix_{m}"] = rand(1, 1, C)
        sd[p + "ffn.key.weight"] = randn(F_, C, std=1 / math.sqrt(C))
        sd[p + "ffn.receptance.weight"] = randn(C, C, std=1 / math.sqrt(C))
        sd[p + "ffn.value.weight"] = randn(C, F_, std=1 / math.sqrt(F_))
    sd["ln_out.weight"], sd["ln_out.bias"] = 1 + randn(C, std=0.1), randn(C, std=0.1)
    sd["head.weight"] = randn(V, C, std=1 / math.sqrt(C))
    return {k: v.to(dtype) for k, v in sd.items()}


def build_model(cfg: RWKV4Config, sd: dict[str, Tensor], dtype=torch.float32, device="cpu",
                quantize: str | None = None) -> RWKV4:
    """A model that uses the given tensors (no copy when dtype and device already match).

    ``dtype`` is how the matrices (embedding, projections) are stored; vectors (norms, mixes,
    decay, bonus) and activations are fp32 unless the model is fp64, because exp(time_decay)
    and relu(k)^2 lose too much or overflow in half precision. ``quantize="int8"`` stores the
    projections as int8 with per-row scales; an int8 checkpoint loads as int8 either way.
    """
    if quantize not in QUANTIZATIONS:
        raise RwkvpyError(f"unknown quantization {quantize!r}; choose int8 or none")
    if quantize == "int8" and not is_quantized(sd):
        sd = quantize_state_dict(sd)
    int8 = is_quantized(sd)
    vectors = torch.float64 if dtype == torch.float64 else torch.float32
    with torch.device("meta"):
        model = RWKV4(cfg)
        if int8:
            model._use_int8_projections()

    def place(key: str, t: Tensor) -> Tensor:
        if int8 and key.endswith(PROJECTIONS):
            return t.to(device)
        if key.endswith(SCALE_SUFFIX):
            return t.to(device, torch.float32)
        return t.to(device, dtype if t.dim() == 2 else vectors)

    model.load_state_dict({k: place(k, v) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


def quantize_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Projections to int8 with one fp32 scale per output row (``<key>_scale``); the rest as is."""
    out = {}
    for key, t in sd.items():
        if key.endswith(PROJECTIONS):
            out[key], out[key + SCALE_SUFFIX] = quantize_int8(t)
        else:
            out[key] = t
    return out


@torch.no_grad()
def official_init(cfg: RWKV4Config, seed: int = 0) -> dict[str, Tensor]:
    """Initial weights as in the official training code (RWKV-LM v4neo ``generate_init_weight``
    and the layers' "fancy init"): per-layer and per-channel decay, bonus and mix curves;
    tiny uniform embedding; zero key/receptance/output projections; orthogonal elsewhere."""
    g = torch.Generator().manual_seed(seed)
    C, A, L = cfg.n_embd, cfg.dim_att, cfg.n_layer
    sd = {}
    from ..checkpoint.keys import expected_shapes  # deferred: checkpoint imports models

    for key, shape in expected_shapes(cfg).items():
        if key.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight")):
            sd[key] = torch.ones(shape)
        elif key.endswith(".bias"):
            sd[key] = torch.zeros(shape)
        elif key == "emb.weight":
            sd[key] = (torch.rand(shape, generator=g) * 2 - 1) * 1e-4
        elif key.endswith(_ZERO_INIT):
            sd[key] = torch.zeros(shape)
        elif len(shape) == 2:
            gain = math.sqrt(shape[0] / shape[1]) if shape[0] > shape[1] else 1.0
            gain *= 0.5 if key == "head.weight" else 1.0
            sd[key] = _orthogonal(shape, gain, g)
    channel = torch.arange(C, dtype=torch.float64) / C  # i / n_embd
    h = torch.arange(A, dtype=torch.float64) / max(A - 1, 1)
    for i in range(L):
        p = f"blocks.{i}."
        ratio_0_to_1 = i / (L - 1) if L > 1 else 0.0
        ratio_1_to_almost0 = 1.0 - i / L
        sd[p + "att.time_decay"] = (-5 + 8 * h ** (0.7 + 1.3 * ratio_0_to_1)).float()
        zigzag = torch.tensor([(j + 1) % 3 - 1 for j in range(A)], dtype=torch.float64) * 0.5
        sd[p + "att.time_first"] = (math.log(0.3) + zigzag).float()
        curve = channel ** ratio_1_to_almost0
        sd[p + "att.time_mix_k"] = curve.float().view(1, 1, C)
        sd[p + "att.time_mix_v"] = (curve + 0.3 * ratio_0_to_1).float().view(1, 1, C)
        sd[p + "att.time_mix_r"] = (channel ** (0.5 * ratio_1_to_almost0)).float().view(1, 1, C)
        sd[p + "ffn.time_mix_k"] = curve.float().view(1, 1, C)
        sd[p + "ffn.time_mix_r"] = curve.float().view(1, 1, C)
    return sd


_ZERO_INIT = ("att.key.weight", "att.receptance.weight", "att.output.weight", "ffn.value.weight",
              "ffn.receptance.weight")


def _orthogonal(shape, gain: float, g: torch.Generator) -> Tensor:
    """A (rows, cols) matrix with orthonormal rows or columns, times gain (as nn.init.orthogonal_)."""
    rows, cols = shape
    a = torch.randn(max(rows, cols), min(rows, cols), generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))
    q = q if rows >= cols else q.T
    return (gain * q).float().contiguous()
