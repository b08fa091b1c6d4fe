"""A small GPT baseline (pre-norm decoder, learned positions, causal SDPA), as in nanoGPT,
for like-for-like comparisons under the same trainer, and attention decoded as an RNN: with a
KV cache (``GPT.step``) or by recomputation from the token ids (``RecomputeDecoder``,
``RecomputeGPT``). Its projections are plain ``nn.Linear``: no kernel plan, no int8."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import RwkvpyError
from .base import ModelBase, build_from_state_dict, check_positive_ints, config_from_dict
from .state import RecurrentState


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int  # longest sequence (learned positions)

    arch = "gpt"

    def __post_init__(self):
        check_positive_ints(self, ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"))
        if self.n_embd % self.n_head:
            raise RwkvpyError(f"config: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

    def to_dict(self):
        return {"arch": self.arch, **asdict(self)}

    @classmethod
    def from_dict(cls, d) -> "GPTConfig":
        return config_from_dict(cls, d)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None):
        """x (B, T, C) -> (output, (keys, values) of every position so far, (B, nh, t, hs)).
        ``cache``: the keys and values of the positions before x (the KV cache)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is None or cache[0].shape[2] == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            t0 = cache[0].shape[2]  # new position i sees every cached one and new ones up to i
            allowed = torch.arange(t0 + T, device=x.device)[None, :] <= t0 + torch.arange(T, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


class GPTBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.att = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: Tensor, cache=None):
        out, kv = self.att(self.ln1(x), cache)
        x = x + out
        return x + self.proj(F.gelu(self.fc(self.ln2(x)))), kv


@dataclass(frozen=True)
class KVCache(RecurrentState):
    """Attention decoded as an RNN whose state grows: every layer's keys and values so far.
    All rows of a batch are at the same position (the cache is not padded)."""

    k: Tensor  # (L, B, n_head, t, head_size)
    v: Tensor  # (L, B, n_head, t, head_size)
    pos: Tensor  # (B,)
    model_id: str = ""


class GPT(ModelBase):
    """The baseline, nanoGPT's design. ``forward(tokens, state)`` with a :class:`KVCache` state
    continues a sequence (``step`` decodes one token per row), up to ``block_size`` positions."""

    def __init__(self, cfg: GPTConfig, seed: int | None = 0):
        """``seed``: nanoGPT's initialisation with that seed; None leaves the weights to be
        loaded (``build_model``)."""
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList([GPTBlock(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if seed is None:
            return
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # nanoGPT's init: N(0, 0.02), residual projections scaled by depth
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 0.02
                    p.copy_(torch.randn(p.shape, generator=g) * std)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def forward(self, tokens: Tensor, state: KVCache | None = None, *, last_only: bool = False,
                return_state: bool = True) -> tuple[Tensor, KVCache | None]:
        """tokens (B, T) -> logits (B, T, V) and the KV cache after them (training windows:
        ``return_state=False`` keeps none)."""
        tokens = self.check_tokens(tokens)
        B, T = tokens.shape
        start = 0
        if state is not None:
            if state.batch_size != B:
                raise RwkvpyError(f"state has batch {state.batch_size}; tokens have batch {B}")
            if B > 1 and not bool((state.pos == state.pos[0]).all()):
                raise RwkvpyError("a KV cache's rows must be at the same position")
            start = int(state.pos[0]) if B else 0
        if start + T > self.config.block_size:
            raise RwkvpyError(f"{start + T} positions exceed the GPT's {self.config.block_size} learned positions")
        x = self.wte(tokens) + self.wpe(torch.arange(start, start + T, device=tokens.device))
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            x, (k, v) = block(x, None if state is None else (state.k[i], state.v[i]))
            keys.append(k)
            values.append(v)
        if last_only:
            x = x[:, -1:]
        logits = self.head(self.ln_f(x))
        if not return_state:
            return logits, None
        model_id = state.model_id if state is not None else self.state_id()
        pos = (state.pos if state is not None else torch.zeros(B, dtype=torch.long, device=tokens.device)) + T
        return logits, KVCache(torch.stack(keys), torch.stack(values), pos, model_id)

    def zero_state(self, batch_size: int = 1) -> KVCache:
        c = self.config
        shape = (c.n_layer, batch_size, c.n_head, 0, c.n_embd // c.n_head)
        dtype = self.wte.weight.dtype
        return KVCache(torch.zeros(shape, dtype=dtype, device=self.device), torch.zeros(shape, dtype=dtype,
                       device=self.device), torch.zeros(batch_size, dtype=torch.long, device=self.device),
                       self.state_id())


class RecomputeDecoder:
    """Attention decoded as an RNN with constant working memory (Jianlin Su, "Attention as a
    quadratic-time RNN", 2024): it keeps only the token ids. Each new token's output at layer l
    needs the keys and values of every earlier position at layer l, so those positions' inputs
    are recomputed, layer by layer, from the ids; per layer one frame of running online-softmax
    sums (m, z, y) is live at a time, so memory beyond the ids is flat in t while the number of
    layer evaluations for position j is ``N_0 = 1, N_l(j) = 1 + N_{l-1}(j) + sum_{i<=j} N_{l-1}(i)``
    (counted in ``evaluations``): time per token grows like t^L.
    """

    def __init__(self, model: GPT):
        self.model = model
        self.ids: list[int] = []
        self.evaluations = 0

    @torch.no_grad()
    def step(self, token: int) -> Tensor:
        """Read one token; the logits (V,) for the next."""
        if len(self.ids) >= self.model.config.block_size:
            raise RwkvpyError(f"the GPT has {self.model.config.block_size} learned positions")
        self.ids.append(int(token))
        m = self.model
        return m.head(m.ln_f(self._hidden(len(m.blocks), len(self.ids) - 1)))

    def _hidden(self, layer: int, j: int) -> Tensor:
        """The residual stream at position j after ``layer`` blocks, (C,), from the ids alone."""
        m = self.model
        self.evaluations += 1
        if layer == 0:
            return m.wte.weight[self.ids[j]] + m.wpe.weight[j]
        block = m.blocks[layer - 1]
        att = block.att
        C, nh = m.config.n_embd, m.config.n_head
        x = self._hidden(layer - 1, j)
        q = att.qkv(block.ln1(x))[:C].view(nh, -1)
        scale = q.shape[-1] ** -0.5
        # the frame: running max, normaliser and weighted value sum per head
        mx = torch.full((nh,), float("-inf"), dtype=x.dtype)
        z = torch.zeros(nh, dtype=x.dtype)
        y = torch.zeros(nh, C // nh, dtype=x.dtype)
        for i in range(j + 1):
            _, k, v = att.qkv(block.ln1(self._hidden(layer - 1, i))).split(C)
            s = (q * k.view(nh, -1)).sum(-1) * scale
            new = torch.maximum(mx, s)
            z = z * torch.exp(mx - new) + torch.exp(s - new)
            y = y * torch.exp(mx - new)[:, None] + torch.exp(s - new)[:, None] * v.view(nh, -1)
            mx = new
        x = x + att.proj((y / z[:, None]).reshape(C))
        return x + block.proj(F.gelu(block.fc(block.ln2(x))))


@dataclass(frozen=True)
class RecomputeState(RecurrentState):
    """All a recomputing decoder keeps: the token ids read so far."""

    ids: Tensor  # (1, B, t) int64
    pos: Tensor  # (B,)
    model_id: str = ""


class RecomputeGPT(ModelBase):
    """A GPT answering the model interface through :class:`RecomputeDecoder` (one stream, one
    token at a time: ``rwkvpy generate --decode recompute``). Its state holds only the ids."""

    def __init__(self, model: GPT):
        super().__init__()
        self.gpt = model
        self.config = model.config

    @property
    def device(self) -> torch.device:
        return self.gpt.device

    def zero_state(self, batch_size: int = 1) -> RecomputeState:
        if batch_size != 1:
            raise RwkvpyError("the recomputing decoder runs one stream")
        return RecomputeState(torch.zeros(1, 1, 0, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                              self.gpt.state_id())

    @torch.no_grad()
    def forward(self, tokens: Tensor, state: RecomputeState | None = None, *, last_only: bool = False,
                return_state: bool = True):
        tokens = self.check_tokens(tokens)
        if tokens.shape[0] != 1:
            raise RwkvpyError("the recomputing decoder runs one stream")
        state = state or self.zero_state(1)
        dec = RecomputeDecoder(self.gpt)
        dec.ids = state.ids[0, 0].tolist()
        rows = [dec.step(t) for t in tokens[0].tolist()]
        logits = torch.stack(rows[-1:] if last_only else rows)[None]
        new = RecomputeState(torch.tensor(dec.ids, dtype=torch.long)[None, None], state.pos + tokens.shape[1],
                             state.model_id)
        return logits, (new if return_state else None)


PROJECTIONS: tuple[str, ...] = ()  # plain nn.Linear: nothing for the planner or int8


def parameter_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    C, V = cfg.n_embd, cfg.vocab_size
    shapes = {"wte.weight": (V, C), "wpe.weight": (cfg.block_size, C)}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        shapes.update({p + "ln1.weight": (C,), p + "ln1.bias": (C,), p + "att.qkv.weight": (3 * C, C),
                       p + "att.proj.weight": (C, C), p + "ln2.weight": (C,), p + "ln2.bias": (C,),
                       p + "fc.weight": (4 * C, C), p + "proj.weight": (C, 4 * C)})
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,), "head.weight": (V, C)})
    return shapes


def build_model(cfg: GPTConfig, sd: dict[str, Tensor], dtype=torch.float32, device="cpu",
                quantize: str | None = None) -> GPT:
    if quantize:
        raise RwkvpyError("the GPT baseline has no int8 form")
    return build_from_state_dict(lambda: GPT(cfg, seed=None), sd, PROJECTIONS, lambda key, t: t.dim() == 2,
                                 dtype, device)


def official_init(cfg: GPTConfig, seed: int = 0) -> dict[str, Tensor]:
    """nanoGPT's initialisation (as ``GPT(cfg, seed)``)."""
    return {k: v.clone() for k, v in GPT(cfg, seed=seed).state_dict().items()}


def random_state_dict(cfg: GPTConfig, seed: int = 0, dtype=torch.float32) -> dict[str, Tensor]:
    return {k: v.to(dtype) for k, v in official_init(cfg, seed).items()}
