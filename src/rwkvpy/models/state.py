"""The recurrent state of RWKV-4: everything a model needs to continue a sequence.

Layer tensors are (n_layer, B, width) in float32 whatever the weights' dtype (half-precision
state overflows); ``pos`` (B,) counts the tokens each row has read; ``model_id`` is the
fingerprint of the weights that made the state. States are never modified in place:
methods and model calls return new ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from ..errors import RwkvpyError
from ..io import atomic_write
from ..ops.wkv import EMPTY_LOG, WkvState

STATE_FORMAT = "rwkvpy-state"
STATE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class RWKV4State:
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

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model_id"}

    def _map(self, fn) -> "RWKV4State":
        """Apply fn(name, tensor, batch_dim) to every tensor."""
        return RWKV4State(**{k: fn(k, v, 0 if k == "pos" else 1) for k, v in self.tensors().items()},
                          model_id=self.model_id)

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def n_layer(self) -> int:
        return self.att_x.shape[0]

    def clone(self) -> "RWKV4State":
        return self._map(lambda k, v, d: v.clone())

    def to(self, device) -> "RWKV4State":
        return self._map(lambda k, v, d: v.to(device))

    def select(self, rows) -> "RWKV4State":
        """Rows of the batch: an int, a slice, a list or a tensor of indices (keeps the batch dim)."""
        if isinstance(rows, int):
            rows = [rows]
        return self._map(lambda k, v, d: v[rows] if d == 0 else v[:, rows])

    @staticmethod
    def concat(states: list["RWKV4State"]) -> "RWKV4State":
        """Stack several states along the batch dimension (all from the same model)."""
        ids = {s.model_id for s in states}
        if len(ids) > 1:
            raise RwkvpyError("cannot concatenate states of different models")
        first = states[0]
        return first._map(lambda k, v, d: torch.cat([getattr(s, k) for s in states], dim=d))

    def layer_wkv(self, i: int) -> WkvState:
        return WkvState(self.num[i], self.den[i], self.max[i])

    def save(self, path: str | os.PathLike, text: str | None = None) -> None:
        """Write the state (and optionally the text it has read) to a safetensors file, atomically."""
        from safetensors.torch import save_file

        if not self.model_id:
            raise RwkvpyError("this state does not know its model; create states with model.zero_state()")
        meta = {
            "format": STATE_FORMAT,
            "format_version": str(STATE_FORMAT_VERSION),
            "model_fingerprint": self.model_id,
            "dtype": "float32",
            "n_layer": str(self.n_layer),
            "tokens_consumed": json.dumps(self.pos.tolist()),
        }
        if text is not None:
            meta["text"] = text
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_state_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    from ..checkpoint.safetensors_io import read_safetensors

    path = Path(path)
    tensors, meta = read_safetensors(path)
    if meta.get("format") != STATE_FORMAT:
        raise RwkvpyError(f"{path}: not an rwkvpy state file")
    if meta.get("format_version") != str(STATE_FORMAT_VERSION):
        raise RwkvpyError(f"{path}: state format version {meta.get('format_version')!r} is not supported")
    return tensors, meta


def load_state(path: str | os.PathLike, model) -> RWKV4State:
    """A state saved by ``state.save``, checked against the model it is loaded into."""
    return load_state_and_metadata(path, model)[0]


def load_state_and_metadata(path: str | os.PathLike, model) -> tuple[RWKV4State, dict[str, str]]:
    """The state and the file's metadata (``text``, ``tokens_consumed``, ...)."""
    tensors, meta = read_state_file(path)
    saved, ours = meta.get("model_fingerprint", ""), model.fingerprint
    if saved != ours:
        raise RwkvpyError(
            f"{path}: state was saved from a different model (fingerprint {saved[:12]}, "
            f"this model is {ours[:12]})"
        )
    expected = model.zero_state(1)
    names = list(expected.tensors())
    if sorted(tensors) != sorted(names):
        raise RwkvpyError(f"{path}: state has tensors {sorted(tensors)}, expected {sorted(names)}")
    for name in names:
        got, want = tensors[name], getattr(expected, name)
        batch_dim = 0 if name == "pos" else 1
        shape_ok = got.dim() == want.dim() and all(
            a == b for i, (a, b) in enumerate(zip(got.shape, want.shape)) if i != batch_dim
        )
        if not shape_ok or got.dtype != want.dtype:
            raise RwkvpyError(f"{path}: state tensor {name!r} has shape {tuple(got.shape)} {got.dtype}, "
                              f"expected {tuple(want.shape)} {want.dtype} (batch may differ)")
    return RWKV4State(**{k: v.to(model.device) for k, v in tensors.items()}, model_id=ours), meta
