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

import torch
from torch import Tensor, nn

from ..errors import RwkvpyError


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
        tensors = list(self.state_dict(keep_vars=True).values())
        key = tuple((id(t), t._version) for t in tensors)
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

    def step(self, tokens: Tensor, state=None):
        """One token per stream: tokens (B,) -> logits (B, V), new state."""
        tokens = torch.as_tensor(tokens)
        if tokens.dim() != 1:
            raise RwkvpyError(f"step takes tokens of shape (B,), got {tuple(tokens.shape)}")
        logits, state = self.forward(tokens[:, None], state)
        return logits[:, 0], state

    def compile_step(self) -> None:
        """Route ``step`` through ``torch.compile`` from now on: the per-token small ops fuse
        into a few loops (measured: docs/benchmarks.md). Each new batch size compiles first
        (tens of seconds); needs a C++ compiler at run time, which is why this is opt-in."""
        if "step" not in self.__dict__:  # the instance attribute shadows the method
            self.step = torch.compile(type(self).step.__get__(self), dynamic=False)
