"""The recurrent state of RWKV-4: everything a model needs to continue a sequence.

Every tensor is (n_layer, B, width) in float32 whatever the weights' dtype: half-precision
state overflows. Objects are never modified in place; methods return new states.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ..ops.wkv import EMPTY_LOG, WkvState


@dataclass(frozen=True)
class RWKV4State:
    att_x: Tensor  # (L, B, n_embd)  last normalised input of time mixing (token shift)
    ffn_x: Tensor  # (L, B, n_embd)  last normalised input of channel mixing (token shift)
    num: Tensor  # (L, B, dim_att)  WKV numerator,   a = num * e^max
    den: Tensor  # (L, B, dim_att)  WKV denominator, b = den * e^max
    max: Tensor  # (L, B, dim_att)  WKV log scale

    @staticmethod
    def zeros(n_layer: int, batch: int, n_embd: int, dim_att: int, device=None) -> "RWKV4State":
        def z(width):
            return torch.zeros(n_layer, batch, width, dtype=torch.float32, device=device)

        return RWKV4State(z(n_embd), z(n_embd), z(dim_att), z(dim_att), z(dim_att) + EMPTY_LOG)

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def batch_size(self) -> int:
        return self.att_x.shape[1]

    @property
    def n_layer(self) -> int:
        return self.att_x.shape[0]

    def clone(self) -> "RWKV4State":
        return RWKV4State(**{k: v.clone() for k, v in self.tensors().items()})

    def to(self, device) -> "RWKV4State":
        return RWKV4State(**{k: v.to(device) for k, v in self.tensors().items()})

    def select(self, rows) -> "RWKV4State":
        """Rows of the batch: an int, a slice, a list or a tensor of indices (keeps the batch dim)."""
        if isinstance(rows, int):
            rows = [rows]
        return RWKV4State(**{k: v[:, rows] for k, v in self.tensors().items()})

    @staticmethod
    def concat(states: list["RWKV4State"]) -> "RWKV4State":
        """Stack several states along the batch dimension."""
        names = [f.name for f in fields(RWKV4State)]
        return RWKV4State(**{n: torch.cat([getattr(s, n) for s in states], dim=1) for n in names})

    def layer_wkv(self, i: int) -> WkvState:
        return WkvState(self.num[i], self.den[i], self.max[i])
