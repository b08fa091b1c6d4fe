"""RetNet (Retentive Network, Sun et al. 2023, arXiv 2307.08621): multi-scale retention in a
pre-LayerNorm decoder, run in parallel (training), chunkwise (prefill, long sequences) or
recurrent (one token) form. Per block (C = n_embd, h heads, d_k = C / h, d_v = value_factor d_k):

    Y  = X + W_O (swish(X' W_G) * norm_per_head(retention(Q, K, V)))   X' = ln1(X)
         Q = rotate(X' W_Q),  K = rotate(X' W_K) d_k^-0.5,  V = X' W_V   (rotation at global positions)
    X' = Y + W_2 gelu(W_1 ln2(Y))

Each head decays by its own gamma (``decay="reference"``: 1 - 2^(-5-i), torchscale's;
``"log"``: the paper's log-spaced 1 - 1/32 .. 1 - 1/512). The per-head norm is an RMS norm
without weights (the reference code's); ``normalize=True`` adds the paper's 1/sqrt(sum
gamma^i) at the global position (the norm cancels it but for its eps). No checkpoint format of
its own beyond rwkvpy's: the key names are this module's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import RwkvpyError
from ..ops.linear import Linear
from ..ops.retention import (decays, position_scale, retention_chunkwise, retention_parallel, retention_step, rotate,
                             rotation)
from .base import LanguageModel, build_from_state_dict, check_positive_ints, config_from_dict, finish
from .state import RecurrentState

PARALLEL_MAX_T = 256  # training windows up to this length take the O(T^2) parallel form
CHUNK_LEN = 64
SEGMENT_LEN = 1024


@dataclass(frozen=True)
class RetNetConfig:
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int = 4
    value_factor: int = 2  # d_v = value_factor * d_k
    ffn_dim: int | None = None  # default 2 * n_embd: 12 C^2 weights per layer, as a Transformer
    decay: str = "reference"
    normalize: bool = False
    norm_eps: float = 1e-6  # of the per-head norm
    layer_norm_eps: float = 1e-5

    arch = "retnet"

    def __post_init__(self):
        if self.ffn_dim is None:
            object.__setattr__(self, "ffn_dim", 2 * self.n_embd if isinstance(self.n_embd, int) else None)
        check_positive_ints(self, ("vocab_size", "n_embd", "n_layer", "n_head", "value_factor", "ffn_dim"))
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise RwkvpyError(f"config: n_embd {self.n_embd} must split into {self.n_head} heads of an even width")
        if self.decay not in ("reference", "log"):
            raise RwkvpyError(f"config: decay {self.decay!r}; choose reference or log")

    @property
    def d_k(self) -> int:
        return self.n_embd // self.n_head

    @property
    def d_v(self) -> int:
        return self.value_factor * self.d_k

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RetNetConfig":
        return config_from_dict(cls, d)


PROJECTIONS = ("att.query.weight", "att.key.weight", "att.value.weight", "att.gate.weight", "att.output.weight",
               "ffn.fc1.weight", "ffn.fc2.weight", "head.weight")


def parameter_shapes(cfg: RetNetConfig) -> dict[str, tuple[int, ...]]:
    C, V, F_, Cv = cfg.n_embd, cfg.vocab_size, cfg.ffn_dim, cfg.n_head * cfg.d_v
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        for name, shape in (("ln1.weight", (C,)), ("ln1.bias", (C,)), ("att.query.weight", (C, C)),
                            ("att.key.weight", (C, C)), ("att.value.weight", (Cv, C)), ("att.gate.weight", (Cv, C)),
                            ("att.output.weight", (C, Cv)), ("ln2.weight", (C,)), ("ln2.bias", (C,)),
                            ("ffn.fc1.weight", (F_, C)), ("ffn.fc2.weight", (C, F_))):
            shapes[p + name] = shape
    shapes["ln_out.weight"] = (C,)
    shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes


@dataclass(frozen=True)
class RetNetState(RecurrentState):
    """Per layer and batch row: each head's retention state."""

    att: Tensor  # (L, B, h, d_k, d_v)
    pos: Tensor  # (B,) int64: tokens read (the global position of the next one)
    model_id: str = ""


class Retention(nn.Module):
    def __init__(self, cfg: RetNetConfig):
        super().__init__()
        C, Cv = cfg.n_embd, cfg.n_head * cfg.d_v
        self.cfg = cfg
        self.query, self.key = Linear(C, C), Linear(C, C)
        self.value, self.gate = Linear(C, Cv), Linear(C, Cv)
        self.output = Linear(Cv, C)

    def forward(self, x: Tensor, pos: Tensor, rot: Tensor, S: Tensor | None, log_gamma: Tensor,
                form: str, state_out: bool = True, S_out: Tensor | None = None):
        """x (B, T, C) -> (output, state after the last token); ``S=None`` is a zero state and
        ``state_out=False`` skips the state out (training); one token's state goes to ``S_out``
        where given."""
        cfg = self.cfg
        B, T, _ = x.shape
        h, dk, dv = cfg.n_head, cfg.d_k, cfg.d_v
        if torch.is_grad_enabled() and self.query.weight.requires_grad:
            # Training: one product for the four projections, and one rotation for q and k (the
            # planned kernels are for inference; a gradient always takes F.linear).
            w = torch.cat([self.query.weight, self.key.weight, self.value.weight, self.gate.weight])
            qk, v, g = F.linear(x, w).split([2 * h * dk, h * dv, h * dv], -1)
            q, k = rotate(qk.reshape(B, T, 2 * h, dk), rot).split(h, 2)
        else:
            q, k, v, g = self.query(x), self.key(x), self.value(x), self.gate(x)
            q, k = rotate(q.reshape(B, T, h, dk), rot), rotate(k.reshape(B, T, h, dk), rot)
        k = k * dk ** -0.5
        v = v.reshape(B, T, h, dv)
        if T == 1:
            o, S = retention_step(q[:, 0], k[:, 0], v[:, 0], log_gamma, S, out=S_out)
            o = o.unsqueeze(1)
        elif form == "parallel":
            o, S = retention_parallel(q, k, v, log_gamma, S, state_out)
        else:
            o, S = retention_chunkwise(q, k, v, log_gamma, S, chunk_len=CHUNK_LEN)
        if cfg.normalize:
            o = o * position_scale(pos, log_gamma)
        o = F.rms_norm(o, (dv,), eps=cfg.norm_eps)  # per head, no weights
        return self.output(F.silu(g) * o.reshape(B, T, h * dv)), S


class FeedForward(nn.Module):
    def __init__(self, cfg: RetNetConfig):
        super().__init__()
        self.fc1 = Linear(cfg.n_embd, cfg.ffn_dim)
        self.fc2 = Linear(cfg.ffn_dim, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: RetNetConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.att = Retention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)


class RetNet(LanguageModel):
    def __init__(self, cfg: RetNetConfig):
        super().__init__(cfg, [Block(cfg) for _ in range(cfg.n_layer)])
        with torch.device("cpu"):  # also when the model is built on the meta device
            self._log_gamma = decays(cfg.n_head, cfg.decay)  # (h,) fp64; a constant of the config, not a weight

    def zero_state(self, batch_size: int = 1) -> RetNetState:
        c = self.config
        dtype = self._state_dtype()
        att = torch.zeros(c.n_layer, batch_size, c.n_head, c.d_k, c.d_v, dtype=dtype, device=self.device)
        return RetNetState(att, torch.zeros(batch_size, dtype=torch.long, device=self.device), self.state_id())

    def forward(self, tokens: Tensor, state: RetNetState | None = None, *, last_only: bool = False,
                return_state: bool = True) -> tuple[Tensor, RetNetState | None]:
        return finish(self.forward_in_steps(tokens, state, last_only=last_only, return_state=return_state))

    def forward_in_steps(self, tokens: Tensor, state: RetNetState | None = None, *, last_only: bool = False,
                         return_state: bool = True):
        T = torch.as_tensor(tokens).shape[-1]
        form = "parallel" if self.wants_grad() and T <= PARALLEL_MAX_T else "chunkwise"
        return self.run_segments(tokens, state, SEGMENT_LEN, last_only, return_state,
                                 lambda t, s, lo, rs, zero_in: self._segment(t, s, form, lo, zero_in, rs))

    def _segment(self, tokens: Tensor, state: RetNetState, form: str, last_only: bool, zero_in: bool,
                 state_out: bool):
        x = self.emb(tokens).to(self.activation_dtype)
        T = tokens.shape[1]
        pos = state.pos[:, None] + torch.arange(T, device=tokens.device)  # (B, T) global positions
        log_gamma = self._log_gamma.to(x.device, x.dtype)
        rot = rotation(pos, self.config.d_k, x.dtype)
        states = []
        # Decoding without a gradient writes each layer's state straight into the next state.
        new_att = None
        if T == 1 and state_out and not torch.is_grad_enabled() and state.att.dtype == x.dtype:
            new_att = torch.empty_like(state.att)
        for i, block in enumerate(self.blocks):
            S = None if zero_in else state.att[i].to(x.dtype)
            out, S = block.att(block.ln1(x), pos, rot, S, log_gamma, form, state_out,
                               None if new_att is None else new_att[i])
            x = x + out
            x = x + block.ffn(block.ln2(x))
            states.append(S)
            yield None  # between layers
        if last_only:
            x = x[:, -1:]
        new = None
        if state_out:
            att = new_att if new_att is not None else torch.stack(states).to(state.att.dtype)
            new = RetNetState(att, state.pos + T, state.model_id)
        yield self.head(self.ln_out(x)), new


def build_model(cfg: RetNetConfig, sd: dict[str, Tensor], dtype=torch.float32, device="cpu",
                quantize: str | None = None) -> RetNet:
    return build_from_state_dict(lambda: RetNet(cfg), sd, PROJECTIONS, lambda key, t: t.dim() == 2, dtype, device,
                                 quantize)


def _xavier(shape, gain: float, g: torch.Generator) -> Tensor:
    bound = gain * math.sqrt(6.0 / (shape[0] + shape[1]))
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


@torch.no_grad()
def official_init(cfg: RetNetConfig, seed: int = 0) -> dict[str, Tensor]:
    """torchscale's initialisation: Q, K, V, G xavier-uniform with gain 2^-2.5, the output
    projection with gain 2^-1; the embedding normal with std C^-0.5; the FFN and the head as
    ``nn.Linear`` (uniform +-1/sqrt(fan_in)); norms one and zero."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in parameter_shapes(cfg).items():
        if key.endswith(".bias"):
            sd[key] = torch.zeros(shape)
        elif len(shape) == 1:
            sd[key] = torch.ones(shape)
        elif key == "emb.weight":
            sd[key] = torch.randn(shape, generator=g) * cfg.n_embd ** -0.5
        elif key.endswith(("att.query.weight", "att.key.weight", "att.value.weight", "att.gate.weight")):
            sd[key] = _xavier(shape, 2 ** -2.5, g)
        elif key.endswith("att.output.weight"):
            sd[key] = _xavier(shape, 2 ** -1, g)
        else:
            sd[key] = (torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(shape[1])
    return sd


def random_state_dict(cfg: RetNetConfig, seed: int = 0, dtype=torch.float32) -> dict[str, Tensor]:
    """Random weights for tests: norms near one, projections keeping activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in parameter_shapes(cfg).items():
        if key.endswith(".bias"):
            t = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1:
            t = 1 + torch.randn(shape, generator=g) * 0.1
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        sd[key] = t.to(dtype)
    return sd
