"""Sampling as pure functions of logits and an explicit ``torch.Generator``.

Order: banned tokens -> repetition penalties -> temperature -> top-k -> top-p -> min-p.
Penalties follow ChatRWKV: every token seen so far loses ``presence`` once plus
``frequency * count``, where counts decay by ``penalty_decay`` after every new token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import RwkvpyError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    min_p: float = 0.0  # drop tokens less likely than min_p * (the most likely token's probability)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = 1.0  # ChatRWKV uses 0.996
    banned_tokens: tuple[int, ...] = ()
    stop_tokens: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    max_new_tokens: int = 256
    seed: int | None = None

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (0 < self.penalty_decay <= 1, "penalty_decay must be in (0, 1]"),
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
            (all(s for s in self.stop_strings), "stop_strings must not contain empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise RwkvpyError(f"sampling: {message}")
        for name in ("banned_tokens", "stop_tokens", "stop_strings"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class Penalties:
    """Decayed counts of the tokens generated so far (one generation's bookkeeping)."""

    counts: Tensor
    seen: Tensor = field(init=False)

    def __post_init__(self):
        self.seen = self.counts > 0

    @staticmethod
    def empty(vocab_size: int) -> "Penalties":
        return Penalties(torch.zeros(vocab_size))

    def add(self, token: int, decay: float) -> None:
        if decay != 1.0:
            self.counts.mul_(decay)
        self.counts[token] += 1
        self.seen[token] = True


def apply_penalties(logits: Tensor, penalties: Penalties, presence: float, frequency: float) -> Tensor:
    if presence == 0 and frequency == 0:
        return logits
    return logits - (presence * penalties.seen + frequency * penalties.counts).to(logits.dtype)


def ban_tokens(logits: Tensor, banned) -> Tensor:
    if not banned:
        return logits
    logits = logits.clone()
    logits[..., list(banned)] = float("-inf")
    return logits


def filter_probs(probs: Tensor, top_k: int, top_p: float, min_p: float) -> Tensor:
    """Zero the probabilities that top-k, top-p and min-p exclude; the top token always stays."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = torch.ones_like(sorted_p, dtype=torch.bool)
    if top_k > 0:
        keep[..., top_k:] = False
    if top_p < 1.0:
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above
        keep &= before < top_p
    if min_p > 0:
        keep &= sorted_p >= min_p * sorted_p[..., :1]
    keep[..., 0] = True
    mask = torch.zeros_like(keep).scatter(-1, order, keep)
    return probs * mask


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """Logits (..., V) -> token ids (...), after penalties and bans have been applied."""
    logits = logits.float()
    if params.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    probs = filter_probs(probs, params.top_k, params.top_p, params.min_p)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
