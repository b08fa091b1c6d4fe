"""A small GPT baseline (pre-norm decoder, learned positions, causal SDPA), as in nanoGPT,
for like-for-like comparisons under the same trainer."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import RwkvpyError
from .base import ModelBase


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int  # longest sequence (learned positions)

    arch = "gpt"

    def to_dict(self):
        return {"arch": self.arch, **asdict(self)}


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class GPTBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.att = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.att(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(ModelBase):
    """The baseline. It answers the model interface's ``forward`` (whole windows); decoding with
    a KV cache as its recurrent state is not built yet, so ``zero_state`` and ``step`` refuse."""

    def __init__(self, cfg: GPTConfig, seed: int = 0):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList([GPTBlock(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # nanoGPT's init: N(0, 0.02), residual projections scaled by depth
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 0.02
                    p.copy_(torch.randn(p.shape, generator=g) * std)

    def forward(self, tokens: Tensor, state=None, *, last_only: bool = False,
                return_state: bool = True) -> tuple[Tensor, None]:
        """tokens (B, T) -> logits (B, T, V). No recurrent state: each call sees only its window."""
        if state is not None:
            self.zero_state()
        tokens = self.check_tokens(tokens)
        T = tokens.shape[1]
        if T > self.config.block_size:
            raise RwkvpyError(f"{T} tokens exceed the GPT's {self.config.block_size} learned positions")
        x = self.wte(tokens) + self.wpe(torch.arange(T, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        if last_only:
            x = x[:, -1:]
        return self.head(self.ln_f(x)), None

    def zero_state(self, batch_size: int = 1):
        raise RwkvpyError("the GPT baseline has no recurrent state yet: KV-cache decoding is not built")

    def step(self, tokens: Tensor, state=None):
        self.zero_state()
