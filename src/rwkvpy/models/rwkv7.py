"""RWKV-7 "Goose" (arXiv 2503.14456; BlinkDL's x070): a matrix-valued state per head, updated by
the generalized delta rule. Parameter names and shapes are the official ones, so ``state_dict()``
is an official checkpoint. Per block, width C, H heads of size N (``x`` the residual stream):

    time mixing     xx = ln1(x);  x_r, x_w, x_k, x_v, x_a, x_g = xx + mix_i (shift(xx) - xx)
                    r = W_r x_r;  k = W_k x_k;  v = W_v x_v
                    log w = -e^-0.5 sigmoid(w0 + tanh(x_w w1) w2)          decay in (e^-0.607, 1)
                    a = sigmoid(a0 + x_a a1 a2)                            in-context learning rate
                    g = sigmoid(x_g g1) g2                                 output gate
                    kk = normalize_per_head(k * k_k);  k = k (1 + (a - 1) k_a)
                    v = v + (v_first - v) sigmoid(v0 + x_v v1 v2)  (layer 0: v_first = v)
                    y = wkv7(r, w, k, v, alpha = -kk, beta = kk a)         (ops/wkv7.py)
                    y = group_norm_per_head(y) + sum_per_head(r k r_k) v
                    x = x + W_o (y g)
    channel mixing  xx = ln2(x);  x_k = xx + mix_k (shift(xx) - xx);  x = x + W_v relu(W_k x_k)^2

with ``ln0`` applied to the embedding before block 0 and ``head(ln_out(x))`` at the end. The
LoRA matrices (w1, a1, ...) are stored (in, out) as the official files have them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import RwkvpyError
from ..ops.activation import squared_relu
from ..ops.linear import Linear
from ..ops.shift import delta_mix, interpolate_token
from ..ops.wkv7 import wkv7_chunked, wkv7_step
from .base import LanguageModel, build_from_state_dict, check_positive_ints, config_from_dict, finish, kept, orthogonal
from .state import RecurrentState

MAX_LOG_DECAY = math.exp(-0.5)  # log w = -e^-0.5 sigmoid(.): decay per token >= e^-0.607
GROUP_NORM_EPS = 64e-5  # the official ln_x eps (not the default 1e-5)
TRAIN_CHUNK_LEN = 32
PREFILL_CHUNK_LEN = 32
SEGMENT_LEN = 1024  # forward() runs longer sequences segment by segment: memory linear in T
LORAS = ("w", "a", "v", "g")  # w1/w2, a1/a2, v1/v2, g1/g2


def suggested_lora_rank(n_embd: int, factor: float) -> int:
    """The official trainer's choice: max(32, round(factor sqrt(C) / 32) * 32)."""
    return max(32, int(round(factor * n_embd ** 0.5 / 32) * 32))


@dataclass(frozen=True)
class RWKV7Config:
    """Shapes of an RWKV-7 model; LoRA ranks default to the official trainer's suggestion."""

    vocab_size: int
    n_embd: int
    n_layer: int
    head_size: int = 64
    dim_ffn: int | None = None  # default 4 * n_embd
    d_decay: int | None = None  # rank of w1/w2
    d_aaa: int | None = None  # rank of a1/a2
    d_mv: int | None = None  # rank of v1/v2 (value residual)
    d_gate: int | None = None  # rank of g1/g2
    layer0_value_lora: bool = False  # layer 0 holds (unused) v0, v1, v2: the trainer's files do
    layer_norm_eps: float = 1e-5

    arch = "rwkv7"

    def __post_init__(self):
        C = self.n_embd
        defaults = {"dim_ffn": 4 * C if isinstance(C, int) else None,
                    "d_decay": suggested_lora_rank(C, 2.5) if isinstance(C, int) else None,
                    "d_aaa": suggested_lora_rank(C, 2.5) if isinstance(C, int) else None,
                    "d_mv": suggested_lora_rank(C, 1.7) if isinstance(C, int) else None,
                    "d_gate": suggested_lora_rank(C, 5.0) if isinstance(C, int) else None}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        check_positive_ints(self, ("vocab_size", "n_embd", "n_layer", "head_size", "dim_ffn", "d_decay",
                                   "d_aaa", "d_mv", "d_gate"))
        if self.n_embd % self.head_size:
            raise RwkvpyError(f"config: n_embd {self.n_embd} is not a multiple of head_size {self.head_size}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def lora_rank(self, name: str) -> int:
        return {"w": self.d_decay, "a": self.d_aaa, "v": self.d_mv, "g": self.d_gate}[name]

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RWKV7Config":
        return config_from_dict(cls, d)


# The matrices that multiply activations (official key suffixes): what int8 quantizes and what
# a half-precision model stores in half (LoRA matrices stay fp32: they are small).
PROJECTIONS = ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight",
               "ffn.key.weight", "ffn.value.weight", "head.weight")
MIXES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")


def has_value_lora(cfg: RWKV7Config, layer: int) -> bool:
    return layer > 0 or cfg.layer0_value_lora


def parameter_shapes(cfg: RWKV7Config) -> dict[str, tuple[int, ...]]:
    """Every key of an RWKV-7 checkpoint (the official names) with its shape: the one statement
    of the layout, used by the modules' test, the loader, the initialisers and the converter."""
    C, F_, V, H, N = cfg.n_embd, cfg.dim_ffn, cfg.vocab_size, cfg.n_head, cfg.head_size
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        for ln in ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2"):
            shapes[f"{p}{ln}.weight"] = (C,)
            shapes[f"{p}{ln}.bias"] = (C,)
        for mix in MIXES:
            shapes[f"{p}att.{mix}"] = (1, 1, C)
        for lora in LORAS:
            if lora == "v" and not has_value_lora(cfg, i):
                continue
            D = cfg.lora_rank(lora)
            if lora != "g":
                shapes[f"{p}att.{lora}0"] = (1, 1, C)
            shapes[f"{p}att.{lora}1"] = (C, D)
            shapes[f"{p}att.{lora}2"] = (D, C)
        shapes[p + "att.k_k"] = (1, 1, C)
        shapes[p + "att.k_a"] = (1, 1, C)
        shapes[p + "att.r_k"] = (H, N)
        for name in ("receptance", "key", "value", "output"):
            shapes[f"{p}att.{name}.weight"] = (C, C)
        shapes[p + "att.ln_x.weight"] = (C,)
        shapes[p + "att.ln_x.bias"] = (C,)
        shapes[p + "ffn.x_k"] = (1, 1, C)
        shapes[p + "ffn.key.weight"] = (F_, C)
        shapes[p + "ffn.value.weight"] = (C, F_)
    shapes["ln_out.weight"] = (C,)
    shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes


@dataclass(frozen=True)
class RWKV7State(RecurrentState):
    """What RWKV-7 carries from token to token, per layer and batch row."""

    att_x: Tensor  # (L, B, C)        last normalised input of time mixing (token shift)
    wkv: Tensor  # (L, B, H, N, N)    the matrix state S per head (values x keys)
    ffn_x: Tensor  # (L, B, C)        last normalised input of channel mixing
    pos: Tensor  # (B,) int64         tokens read by each row
    model_id: str = ""

    @staticmethod
    def zeros(cfg: RWKV7Config, batch: int, device=None, dtype=torch.float32, model_id: str = "") -> "RWKV7State":
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        return RWKV7State(torch.zeros(L, batch, C, dtype=dtype, device=device),
                          torch.zeros(L, batch, H, N, N, dtype=dtype, device=device),
                          torch.zeros(L, batch, C, dtype=dtype, device=device),
                          torch.zeros(batch, dtype=torch.int64, device=device), model_id)

    @staticmethod
    def from_time_state(tensors: dict[str, Tensor], model: "RWKV7", source: str) -> "RWKV7State":
        """The starting state of a state-tuned file: ``blocks.{i}.att.time_state`` (H, N, N) per
        layer, in the orientation of the official x070 kernels (values x keys, as S here; the
        RWKV-5/6 files of ChatRWKV were transposed, x070 ones are not), shifts zero."""
        cfg = model.config
        want = (cfg.n_head, cfg.head_size, cfg.head_size)
        layers = []
        for i in range(cfg.n_layer):
            key = f"blocks.{i}.att.time_state"
            if key not in tensors:
                raise RwkvpyError(f"{source}: missing key {key!r}: not a state-tuned file for this "
                                  f"{cfg.n_layer}-layer model")
            t = tensors[key]
            if tuple(t.shape) != want:
                raise RwkvpyError(f"{source}: key {key!r} has shape {tuple(t.shape)}, expected {want}")
            layers.append(t)
        zero = model.zero_state(1)
        wkv = torch.stack(layers)[:, None].to(zero.wkv.device, zero.wkv.dtype)
        return RWKV7State(zero.att_x, wkv, zero.ffn_x, zero.pos, zero.model_id)


def _lora(x: Tensor, first: Tensor, second: Tensor, inner=None) -> Tensor:
    h = x @ first
    return (inner(h) if inner is not None else h) @ second


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.layer, self.n_head, self.head_size = layer, H, N
        for mix in MIXES:
            setattr(self, mix, nn.Parameter(torch.zeros(1, 1, C)))
        for lora in LORAS:
            if lora == "v" and not has_value_lora(cfg, layer):
                continue
            D = cfg.lora_rank(lora)
            if lora != "g":
                setattr(self, f"{lora}0", nn.Parameter(torch.zeros(1, 1, C)))
            setattr(self, f"{lora}1", nn.Parameter(torch.zeros(C, D)))
            setattr(self, f"{lora}2", nn.Parameter(torch.zeros(D, C)))
        self.k_k = nn.Parameter(torch.zeros(1, 1, C))
        self.k_a = nn.Parameter(torch.zeros(1, 1, C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = Linear(C, C)
        self.key = Linear(C, C)
        self.value = Linear(C, C)
        self.output = Linear(C, C)
        self.ln_x = nn.GroupNorm(H, C, eps=GROUP_NORM_EPS)

    def forward(self, x: Tensor, last_x: Tensor, S: Tensor, v_first: Tensor | None, wkv):
        """x (B, T, C) -> (output (B, T, C), last input (B, C), new S, v_first)."""
        mixed = delta_mix(x, last_x, *self._mixes())
        out, S, v_first = self._mix(x.shape[:-1], mixed, S, v_first, wkv)
        return out, x[:, -1], S, v_first

    def step(self, x: Tensor, last_x: Tensor, S: Tensor, v_first: Tensor | None, wkv):
        """One token per stream, x (B, C) -> (output (B, C), new S, v_first): ``forward``'s
        arithmetic, the six mixes stacked into one op; ``wkv`` takes tensors (B, H, N)."""
        mixes = kept(self, "token_mixes", self._mixes(), lambda: torch.cat(self._mixes()))
        return self._mix(x.shape[:-1], interpolate_token(x, last_x, mixes).unbind(0), S, v_first, wkv)

    def _mixes(self) -> tuple[Tensor, ...]:
        return self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g

    def _mix(self, lead: tuple[int, ...], mixed, S: Tensor, v_first: Tensor | None, wkv):
        """The time mixing after the token shift, for inputs of shape (*lead, C)."""
        xr, xw, xk, xv, xa, xg = mixed
        H, N = self.n_head, self.head_size
        heads, flat = (*lead, H, N), (*lead, H * N)
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        log_w = torch.sigmoid(self.w0 + _lora(xw, self.w1, self.w2, torch.tanh)) * -MAX_LOG_DECAY
        a = torch.sigmoid(self.a0 + _lora(xa, self.a1, self.a2))
        g = _lora(xg, self.g1, self.g2, torch.sigmoid)
        kk = F.normalize((k * self.k_k).view(heads), dim=-1)
        k = k * (1 + (a - 1) * self.k_a)
        if self.layer == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + _lora(xv, self.v1, self.v2))
        y, S = wkv(r.view(heads), log_w.view(heads), k.view(heads), v.view(heads), -kk, kk * a.view(heads), S)
        y = F.group_norm(y.reshape(-1, H * N), H, self.ln_x.weight, self.ln_x.bias, GROUP_NORM_EPS).view(flat)
        bonus = (r.view(heads) * k.view(heads) * self.r_k).sum(-1, keepdim=True) * v.view(heads)
        return self.output((y + bonus.view(flat)) * g), S, v_first


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        self.x_k = nn.Parameter(torch.zeros(1, 1, cfg.n_embd))
        self.key = Linear(cfg.n_embd, cfg.dim_ffn)
        self.value = Linear(cfg.dim_ffn, cfg.n_embd, unbounded_input=True)  # relu(k)^2

    def forward(self, x: Tensor, last_x: Tensor):
        """x (B, T, C) -> (output (B, T, C), last input (B, C)); one token per stream as x (B, C)
        -> (output (B, C), x)."""
        (xk,) = delta_mix(x, last_x, self.x_k)
        return self.value(squared_relu(self.key(xk))), x[:, -1] if x.dim() == 3 else x


class Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer: int):
        super().__init__()
        eps = cfg.layer_norm_eps
        if layer == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd, eps=eps)
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=eps)
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=eps)
        self.att = TimeMix(cfg, layer)
        self.ffn = ChannelMix(cfg)


class RWKV7(LanguageModel):
    """The RWKV-7 language model. ``forward`` takes any length; ``step`` is one token."""

    def __init__(self, cfg: RWKV7Config):
        super().__init__(cfg, [Block(cfg, i) for i in range(cfg.n_layer)])
        self.chunk_len: int | None = None  # None: the measured default for the form

    def zero_state(self, batch_size: int = 1) -> RWKV7State:
        return RWKV7State.zeros(self.config, batch_size, self.device, self._state_dtype(), self.state_id())

    def _step_layer(self, i: int, block: Block, x: Tensor, state: RWKV7State, new: RWKV7State, v_first):
        """Layer i of ``step`` (see :meth:`LanguageModel.step`); the layers carry v_first."""
        def wkv(r, log_w, k, v, alpha, beta, S):
            return wkv7_step(r, log_w, k, v, alpha, beta, S.to(new.wkv.dtype), out=new.wkv[i])

        xx = block.ln1(x)
        out, _, v_first = block.att.step(xx, state.att_x[i], state.wkv[i], v_first, wkv)
        new.att_x[i] = xx
        x = x + out
        xx = block.ln2(x)
        out, _ = block.ffn(xx, state.ffn_x[i])
        new.ffn_x[i] = xx
        return x + out, v_first

    def forward(self, tokens: Tensor, state: RWKV7State | None = None, *, last_only: bool = False,
                return_state: bool = True) -> tuple[Tensor, RWKV7State | None]:
        """tokens (B, T) -> logits (B, T, V) (or (B, 1, V) with ``last_only``), new state.
        ``state`` is not modified; sequences longer than ``SEGMENT_LEN`` run segment by segment."""
        return finish(self.forward_in_steps(tokens, state, last_only=last_only, return_state=return_state))

    def forward_in_steps(self, tokens: Tensor, state: RWKV7State | None = None, *, last_only: bool = False,
                         return_state: bool = True):
        chunk = self.chunk_len or (TRAIN_CHUNK_LEN if self.wants_grad() else PREFILL_CHUNK_LEN)
        return self.run_segments(tokens, state, SEGMENT_LEN, last_only, return_state,
                                 lambda t, s, lo, rs, zero_in: self._segment(t, s, chunk, lo, zero_in))

    def _segment(self, tokens: Tensor, state: RWKV7State, chunk: int, last_only: bool, zero_in: bool):
        x = self.emb(tokens).to(self.activation_dtype)  # (B, T, C)
        sdt = self._state_dtype()

        def wkv(r, log_w, k, v, alpha, beta, S):
            S = None if zero_in else S.to(sdt)  # not r.dtype: under bf16 autocast r is half
            if r.shape[1] == 1:
                y, S = wkv7_step(r[:, 0], log_w[:, 0], k[:, 0], v[:, 0], alpha[:, 0], beta[:, 0], S)
                return y.unsqueeze(1), S
            return wkv7_chunked(r, log_w, k, v, alpha, beta, S, chunk_len=chunk)

        att_x, wkv_s, ffn_x = [], [], []
        v_first = None
        for i, block in enumerate(self.blocks):
            if i == 0:
                x = block.ln0(x)
            out, ax, S, v_first = block.att(block.ln1(x), state.att_x[i], state.wkv[i], v_first, wkv)
            x = x + out
            out, fx = block.ffn(block.ln2(x), state.ffn_x[i])
            x = x + out
            att_x.append(ax)
            wkv_s.append(S)
            ffn_x.append(fx)
            yield None  # between layers
        if last_only:
            x = x[:, -1:]
        logits = self.head(self.ln_out(x))
        new = RWKV7State(torch.stack(att_x).to(sdt), torch.stack(wkv_s).to(sdt), torch.stack(ffn_x).to(sdt),
                         state.pos + tokens.shape[1], state.model_id)
        yield logits, new


def is_matrix(key: str, t: Tensor) -> bool:
    """Stored in the model's dtype: the embedding and the projections (not LoRA, not r_k)."""
    return key == "emb.weight" or key.endswith(PROJECTIONS)


def build_model(cfg: RWKV7Config, sd: dict[str, Tensor], dtype=torch.float32, device="cpu",
                quantize: str | None = None) -> RWKV7:
    """An RWKV-7 model on the given tensors (see :func:`~rwkvpy.models.base.build_from_state_dict`)."""
    return build_from_state_dict(lambda: RWKV7(cfg), sd, PROJECTIONS, is_matrix, dtype, device, quantize)


def random_state_dict(cfg: RWKV7Config, seed: int = 0, dtype=torch.float32) -> dict[str, Tensor]:
    """Random weights in official names and shapes, with the value ranges of trained models:
    decays from none to the fastest, in-context rates across (0, 1), value residual gates and
    bonuses that matter, activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in parameter_shapes(cfg).items():
        name = key.rsplit(".", 1)[-1] if ".weight" not in key and ".bias" not in key else key
        if key.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight", "ln_x.weight")):
            t = 1 + torch.randn(shape, generator=g) * 0.1
        elif key.endswith(".bias"):
            t = torch.randn(shape, generator=g) * 0.1
        elif name in MIXES or name == "x_k":
            t = torch.rand(shape, generator=g)
        elif name == "w0":
            t = torch.rand(shape, generator=g) * 12 - 8  # sigmoid from 3e-4 to 0.98
        elif name in ("a0", "v0"):
            t = torch.randn(shape, generator=g)
        elif name == "k_k":
            t = 0.7 + torch.randn(shape, generator=g) * 0.2
        elif name == "k_a":
            t = 1 + torch.randn(shape, generator=g) * 0.2
        elif name == "r_k":
            t = torch.randn(shape, generator=g) * 0.3
        elif name.endswith("1") or name.endswith("2"):  # LoRA: (in, out)
            t = torch.randn(shape, generator=g) / math.sqrt(shape[0])
        else:  # embedding and projections (out, in)
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        sd[key] = t.to(dtype)
    return sd


@torch.no_grad()
def official_init(cfg: RWKV7Config, seed: int = 0) -> dict[str, Tensor]:
    """Initial weights as in the official trainer (RWKV-LM ``RWKV-v7/train_temp/src/model.py``:
    the layers' init, then ``generate_init_weight``): per-layer mix curves; decay, in-context
    rate and value-residual biases by channel and head; LoRA first matrices zero, second ones
    orthogonal x 0.1; receptance / value orthogonal, key orthogonal x 0.1, output and
    ffn.value zero, ffn.key orthogonal; ln_x weights ((layer + 1) / L)^0.7; embedding uniform
    +-1e-4; head orthogonal x 0.5 sqrt(V / C)."""
    g = torch.Generator().manual_seed(seed)
    C, L, N, V = cfg.n_embd, cfg.n_layer, cfg.head_size, cfg.vocab_size
    n = torch.arange(C, dtype=torch.float64)
    ddd = n / C
    linear = n / (C - 1) - 0.5 if C > 1 else torch.zeros(C, dtype=torch.float64)
    zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2) if N > 1 else torch.zeros(C, dtype=torch.float64)
    zigzag = zigzag * zigzag.abs()
    sd = {}
    for key, shape in parameter_shapes(cfg).items():
        if key.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight")):
            sd[key] = torch.ones(shape)
        elif key.endswith(".bias"):
            sd[key] = torch.zeros(shape)
        elif key == "emb.weight":
            sd[key] = (torch.rand(shape, generator=g) * 2 - 1) * 1e-4
        elif key == "head.weight":
            sd[key] = orthogonal(shape, 0.5 * math.sqrt(V / C) if V > C else 0.5, g)
    for i in range(L):
        p = f"blocks.{i}.att."
        ratio_0_to_1 = i / (L - 1) if L > 1 else 0.0
        ratio_1_to_almost0 = 1.0 - i / L
        for mix, power in zip(MIXES, (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)):
            sd[p + mix] = (1.0 - ddd ** (power * ratio_1_to_almost0)).float().view(1, 1, C)
        decay_speed = -6 + 6 * (n / max(C - 1, 1)) ** (1 + ratio_0_to_1 ** 0.3)
        biases = {"w": decay_speed + 0.5 + zigzag * 2.5, "a": -0.19 + zigzag * 0.3 + linear * 0.4,
                  "v": 0.73 - linear * 0.4}
        for lora in LORAS:
            if lora == "v" and not has_value_lora(cfg, i):
                continue
            D = cfg.lora_rank(lora)
            if lora in biases:
                sd[f"{p}{lora}0"] = biases[lora].float().view(1, 1, C)
            sd[f"{p}{lora}1"] = torch.zeros(C, D)
            sd[f"{p}{lora}2"] = orthogonal((D, C), 0.1 * (math.sqrt(D / C) if D > C else 1.0), g)
        sd[p + "k_k"] = (0.71 - linear * 0.1).float().view(1, 1, C)
        sd[p + "k_a"] = torch.full((1, 1, C), 1.02)
        sd[p + "r_k"] = torch.full((cfg.n_head, N), -0.04)
        sd[p + "receptance.weight"] = orthogonal((C, C), 1.0, g)
        sd[p + "key.weight"] = orthogonal((C, C), 0.1, g)
        sd[p + "value.weight"] = orthogonal((C, C), 1.0, g)
        sd[p + "output.weight"] = torch.zeros(C, C)
        sd[p + "ln_x.weight"] = torch.full((C,), ((1 + i) / L) ** 0.7)
        f = f"blocks.{i}.ffn."
        sd[f + "x_k"] = (1.0 - ddd ** (ratio_1_to_almost0 ** 4)).float().view(1, 1, C)
        sd[f + "key.weight"] = orthogonal((cfg.dim_ffn, C), 1.0, g)
        sd[f + "value.weight"] = torch.zeros(C, cfg.dim_ffn)
    return {k: sd[k] for k in parameter_shapes(cfg)}
