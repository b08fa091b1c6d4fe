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

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..ops.activation import channel_mix_products, squared_relu
from ..ops.linear import Linear
from ..ops.shift import interpolate_token, time_mix
from ..ops.wkv import (EMPTY_LOG, WkvState, own_terms_may_underflow, token_terms, wkv_chunked, wkv_matmul,
                      wkv_token)
from .base import LanguageModel, build_from_state_dict, check_positive_ints, config_from_dict, finish, kept, orthogonal
from .state import RecurrentState

# Chunk lengths as measured (docs/benchmarks.md, the 2026-11-22 and 2026-11-24 entries in History).
TRAIN_CHUNK_LEN = 16  # the matrix-product form with its written-out backward, for training
PREFILL_CHUNK_LEN_CPU = 32  # the same form without a graph, for inference on a CPU
CHUNK_LEN_CPU = 4  # the chunked form (compiled code; keys too spread for the matrix-product form)
CHUNK_LEN_ACCELERATOR = 64  # the chunked form on a GPU, where kernel launches dominate
SEGMENT_LEN = 1024  # forward() runs longer sequences segment by segment: memory linear in T


@dataclass(frozen=True)
class RWKV4Config:
    """Shapes of an RWKV-4 model. ``dim_att`` and ``dim_ffn`` follow the official names."""

    vocab_size: int
    n_embd: int
    n_layer: int
    dim_att: int | None = None  # width of k, v, r and the WKV state; default n_embd
    dim_ffn: int | None = None  # width of the channel-mixing hidden layer; default 4 * n_embd
    layer_norm_eps: float = 1e-5

    arch = "rwkv4"

    def __post_init__(self):
        if self.dim_att is None:
            object.__setattr__(self, "dim_att", self.n_embd)
        if self.dim_ffn is None:
            object.__setattr__(self, "dim_ffn", 4 * self.n_embd)
        check_positive_ints(self, ("vocab_size", "n_embd", "n_layer", "dim_att", "dim_ffn"))

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RWKV4Config":
        return config_from_dict(cls, d)


# The matrices that multiply activations (official key suffixes): what int8 quantizes.
PROJECTIONS = ("att.key.weight", "att.value.weight", "att.receptance.weight", "att.output.weight",
               "ffn.key.weight", "ffn.receptance.weight", "ffn.value.weight", "head.weight")


def parameter_shapes(cfg: RWKV4Config) -> dict[str, tuple[int, ...]]:
    """Every key of an RWKV-4 checkpoint (the official names) with its shape, in the official
    order: the one statement of the layout, used by the modules' test, the loader, the
    initialisers and the converter."""
    C, A, F, V = cfg.n_embd, cfg.dim_att, cfg.dim_ffn, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        for ln in ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2"):
            shapes[f"{p}{ln}.weight"] = (C,)
            shapes[f"{p}{ln}.bias"] = (C,)
        shapes[p + "att.time_decay"] = (A,)
        shapes[p + "att.time_first"] = (A,)
        for m in "kvr":
            shapes[f"{p}att.time_mix_{m}"] = (1, 1, C)
        for name in ("key", "value", "receptance"):
            shapes[f"{p}att.{name}.weight"] = (A, C)
        shapes[p + "att.output.weight"] = (C, A)
        for m in "kr":
            shapes[f"{p}ffn.time_mix_{m}"] = (1, 1, C)
        shapes[p + "ffn.key.weight"] = (F, C)
        shapes[p + "ffn.receptance.weight"] = (C, C)
        shapes[p + "ffn.value.weight"] = (C, F)
    shapes["ln_out.weight"] = (C,)
    shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes


@dataclass(frozen=True)
class RWKV4State(RecurrentState):
    """What RWKV-4 carries from token to token, per layer and batch row."""

    att_x: Tensor  # (L, B, n_embd)  last normalised input of time mixing (token shift)
    ffn_x: Tensor  # (L, B, n_embd)  last normalised input of channel mixing (token shift)
    num: Tensor  # (L, B, dim_att)  WKV numerator,   a = num * e^max
    den: Tensor  # (L, B, dim_att)  WKV denominator, b = den * e^max
    max: Tensor  # (L, B, dim_att)  WKV log scale
    pos: Tensor  # (B,) int64      tokens read by each row
    model_id: str = ""  # fingerprint of the model's weights ("" if unknown)

    @staticmethod
    def zeros(n_layer: int, batch: int, n_embd: int, dim_att: int, device=None,
              model_id: str = "") -> "RWKV4State":
        def z(width):
            return torch.zeros(n_layer, batch, width, dtype=torch.float32, device=device)

        pos = torch.zeros(batch, dtype=torch.int64, device=device)
        return RWKV4State(z(n_embd), z(n_embd), z(dim_att), z(dim_att), z(dim_att) + EMPTY_LOG, pos, model_id)

    def layer_wkv(self, i: int) -> WkvState:
        return WkvState(self.num[i], self.den[i], self.max[i])


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

    def forward(self, xx: Tensor, last_x: Tensor, s: WkvState, wkv, channels_first: bool):
        """xx (B, T, C) -> (output (B, T, C), last input (B, C), WKV state); ``wkv(w, u, k, v, s)``
        is the form the model chose; ``channels_first`` stores k, v, r as (C, B, T) in memory,
        which the matrix-product form reads fastest."""
        xk, xv, xr = time_mix(xx, last_x, self.time_mix_k, self.time_mix_v, self.time_mix_r)
        k, v = self.key(xk, channels_first), self.value(xv, channels_first)
        r = torch.sigmoid(self.receptance(xr, channels_first))
        # The WKV sums run in the activations' dtype (fp32 at least): exp(k) and the state
        # overflow half precision, which autocast would otherwise give k and v.
        if k.dtype != xx.dtype:
            k, v = k.to(xx.dtype), v.to(xx.dtype)
        w = -torch.exp(self.time_decay.to(xx.dtype))
        u = self.time_first.to(xx.dtype)
        y, s = wkv(w, u, k, v, s)
        return self.output(r * y), xx[:, -1], s

    def step(self, xx: Tensor, last_x: Tensor, s: WkvState) -> tuple[Tensor, WkvState]:
        """One token per stream, xx (B, C): ``forward``'s arithmetic, with the layer's mixes
        stacked and its WKV terms kept between tokens."""
        mixes, terms = kept(self, "token_constants", (self.time_mix_k, self.time_mix_v, self.time_mix_r,
                                                       self.time_decay, self.time_first), self._token_constants)
        xk, xv, xr = interpolate_token(last_x, xx, mixes)
        k, v = self.key(xk), self.value(xv)
        r = torch.sigmoid(self.receptance(xr))
        y, s = wkv_token(terms, k, v, s)
        return self.output(r * y), s

    def _token_constants(self):
        mixes = torch.cat((self.time_mix_k, self.time_mix_v, self.time_mix_r))  # (3, 1, C)
        return mixes, token_terms(-torch.exp(self.time_decay), self.time_first)


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKV4Config):
        super().__init__()
        C, F_ = cfg.n_embd, cfg.dim_ffn
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = Linear(C, F_)
        self.receptance = Linear(C, C)
        self.value = Linear(F_, C, unbounded_input=True)  # relu(k)^2

    def forward(self, xx: Tensor, last_x: Tensor, train: bool = False):
        """xx (B, T, C) -> (output (B, T, C), last input (B, C)). ``train``: a gradient is wanted,
        and the products run as one autograd node with its backward written out."""
        xk, xr = time_mix(xx, last_x, self.time_mix_k, self.time_mix_r)
        if train and self._fusable(xk):
            w = (self.key.weight, self.receptance.weight, self.value.weight)
            return channel_mix_products(xk, xr, *w), xx[:, -1]
        k = squared_relu(self.key(xk))
        r = torch.sigmoid(self.receptance(xr))
        return r * self.value(k), xx[:, -1]

    def step(self, xx: Tensor, last_x: Tensor) -> Tensor:
        """One token per stream, xx (B, C): ``forward``'s arithmetic, the mixes stacked."""
        mixes = kept(self, "token_mixes", (self.time_mix_k, self.time_mix_r),
                     lambda: torch.cat((self.time_mix_k, self.time_mix_r)))
        xk, xr = interpolate_token(last_x, xx, mixes)
        k = squared_relu(self.key(xk))
        return torch.sigmoid(self.receptance(xr)) * self.value(k)

    def _fusable(self, xk: Tensor) -> bool:
        projections = (self.key, self.receptance, self.value)
        return (not torch.is_autocast_enabled(xk.device.type)
                and all(type(p) is Linear and p.weight.dtype == xk.dtype for p in projections))


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


class RWKV4(LanguageModel):
    """The RWKV-4 language model. ``forward`` takes any length; ``step`` is one token."""

    def __init__(self, cfg: RWKV4Config):
        super().__init__(cfg, [Block(cfg, i) for i in range(cfg.n_layer)])
        self.chunk_len: int | None = None  # None: the measured default for the form

    def _state_dtype(self) -> torch.dtype:
        return torch.float32  # RWKV4State is fp32 in every model

    def zero_state(self, batch_size: int = 1) -> RWKV4State:
        c = self.config
        return RWKV4State.zeros(c.n_layer, batch_size, c.n_embd, c.dim_att, device=self.device,
                                model_id=self.state_id())

    def _step_layer(self, i: int, block: Block, x: Tensor, state: RWKV4State, new: RWKV4State, carry):
        """Layer i of ``step`` (see :meth:`LanguageModel.step`)."""
        xx = block.ln1(x)
        out, s = block.att.step(xx, state.att_x[i], state.layer_wkv(i))
        new.att_x[i], new.num[i], new.den[i], new.max[i] = xx, *s
        x = x + out
        xx = block.ln2(x)
        new.ffn_x[i] = xx
        return x + block.ffn.step(xx, state.ffn_x[i]), None

    def forward(
        self, tokens: Tensor, state: RWKV4State | None = None, *, last_only: bool = False,
        return_state: bool = True,
    ) -> tuple[Tensor, RWKV4State | None]:
        """tokens (B, T) -> logits (B, T, V) (or (B, 1, V) with ``last_only``), new state.

        ``state`` is not modified. Each row of the batch is an independent sequence. Sequences
        longer than ``SEGMENT_LEN`` run segment by segment, the state carried between them, so
        memory grows linearly with T. ``return_state=False`` returns None for the state and
        skips computing it where it can (training on windows).
        """
        return finish(self.forward_in_steps(tokens, state, last_only=last_only, return_state=return_state))

    def forward_in_steps(self, tokens: Tensor, state: RWKV4State | None = None, *, last_only: bool = False,
                         return_state: bool = True):
        form = self._form()
        return self.run_segments(tokens, state, SEGMENT_LEN, last_only, return_state,
                                 lambda t, s, lo, rs, zero_in: self._segment(t, s, form, lo, rs))

    def _form(self) -> str:
        """The one place that decides how sequences run (docs/design.md, "forms"):

        - ``train``: a gradient is wanted: the matrix-product WKV with its written-out backward;
        - ``compiled``: inside torch.compile: the chunked WKV (no data-dependent fallback);
        - ``prefill``: inference on a CPU: the matrix-product WKV without a graph;
        - ``chunked``: inference elsewhere (GPUs): the chunked WKV.
        One token always takes the recurrent step.
        """
        if torch.compiler.is_compiling():
            return "compiled"
        if self.wants_grad():
            return "train"
        return "prefill" if self.device.type == "cpu" else "chunked"

    def _wkv(self, form: str, w: Tensor, u: Tensor, k: Tensor, v: Tensor, s: WkvState, final_state: bool):
        """The WKV of one layer in the form chosen by :meth:`_form` (k, v (B, T, C))."""
        if k.shape[1] == 1:
            y, s = wkv_token(token_terms(w, u), k[:, 0], v[:, 0], s)
            return y.unsqueeze(1), s
        if form in ("train", "prefill") and not own_terms_may_underflow(k.detach(), u.detach(), s.max):
            chunk = self.chunk_len or (TRAIN_CHUNK_LEN if form == "train" else PREFILL_CHUNK_LEN_CPU)
            return wkv_matmul(w, u, k, v, s, chunk_len=chunk, final_state=final_state)
        # Keys spread wider than the matrix-product form's one scale per row allows, or compiled/GPU.
        chunk = self.chunk_len or (CHUNK_LEN_ACCELERATOR if form == "chunked" else CHUNK_LEN_CPU)
        return wkv_chunked(w, u, k, v, s, chunk_len=chunk)

    def _segment(self, tokens: Tensor, state: RWKV4State, form: str, last_only: bool, return_state: bool):
        x = self.emb(tokens).to(self.activation_dtype)  # (B, T, C)
        T = tokens.shape[1]
        # Training stores k, v, r channels first for the WKV's sums over time; in inference the
        # planned kernels beat that layout's plain product at every length (8 to 1,024 tokens).
        channels_first = T > 1 and form == "train"

        def wkv(w, u, k, v, s):
            return self._wkv(form, w, u, k, v, s, final_state=return_state)

        new: dict[str, list[Tensor]] = {name: [] for name in ("att_x", "ffn_x", "num", "den", "max")}
        for i, block in enumerate(self.blocks):
            if i == 0:
                x = block.ln0(x)
            out, att_x, s = block.att(block.ln1(x), state.att_x[i], state.layer_wkv(i), wkv, channels_first)
            x = x + out
            out, ffn_x = block.ffn(block.ln2(x), state.ffn_x[i], train=form == "train")
            x = x + out
            yield None  # between layers
            if return_state:
                new["att_x"].append(att_x)
                new["ffn_x"].append(ffn_x)
                new["num"].append(s.num)
                new["den"].append(s.den)
                new["max"].append(s.max)
        if last_only:
            x = x[:, -1:]
        logits = self.head(self.ln_out(x))
        if not return_state:
            yield logits, None
            return
        layers = {k: torch.stack([t.float() for t in v]) for k, v in new.items()}
        yield logits, RWKV4State(**layers, pos=state.pos + tokens.shape[1], model_id=state.model_id)


def random_state_dict(cfg: RWKV4Config, seed: int = 0, dtype=torch.float32) -> dict[str, Tensor]:
    """Random weights in official names and shapes, with the value ranges of trained models.

    Decays span from almost none to very fast (time_decay in [-6, 6] gives w from -2.5e-3 to
    -400), bonuses and mixes vary per channel, and projections keep activations O(1), so the
    forms are exercised where the numerics are hard.
    """
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in parameter_shapes(cfg).items():
        if key.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight")):
            t = 1 + torch.randn(shape, generator=g) * 0.1
        elif key.endswith(".bias"):
            t = torch.randn(shape, generator=g) * 0.1
        elif key.endswith("time_decay"):
            t = torch.linspace(-6, 6, shape[0])[torch.randperm(shape[0], generator=g)]
        elif key.endswith("time_first") or key == "emb.weight":
            t = torch.randn(shape, generator=g)
        elif "time_mix" in key:
            t = torch.rand(shape, generator=g)
        else:  # projections (out, in): outputs O(1); keys a little wider, so exp(k) spans more
            gain = 1.5 if key.endswith("att.key.weight") else 1.0
            t = torch.randn(shape, generator=g) * (gain / math.sqrt(shape[1]))
        sd[key] = t.to(dtype)
    return sd


def build_model(cfg: RWKV4Config, sd: dict[str, Tensor], dtype=torch.float32, device="cpu",
                quantize: str | None = None) -> RWKV4:
    """An RWKV-4 model on the given tensors: every 2-D tensor is a matrix stored in ``dtype``
    (see :func:`~rwkvpy.models.base.build_from_state_dict`)."""
    return build_from_state_dict(lambda: RWKV4(cfg), sd, PROJECTIONS, lambda key, t: t.dim() == 2,
                                 dtype, device, quantize)


@torch.no_grad()
def official_init(cfg: RWKV4Config, seed: int = 0) -> dict[str, Tensor]:
    """Initial weights as in the official training code (RWKV-LM v4neo ``generate_init_weight``
    and the layers' "fancy init"): per-layer and per-channel decay, bonus and mix curves;
    tiny uniform embedding; zero key/receptance/output projections; orthogonal elsewhere."""
    g = torch.Generator().manual_seed(seed)
    C, A, L = cfg.n_embd, cfg.dim_att, cfg.n_layer
    sd = {}
    for key, shape in parameter_shapes(cfg).items():
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
            sd[key] = orthogonal(shape, gain, g)
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
