"""Recurrent states: everything a model needs to continue its sequences, as named tensors.

Every family's state is a frozen dataclass deriving from :class:`RecurrentState`: layer tensors
are (n_layer, B, ...) in float32 whatever the weights' dtype (half-precision state overflows),
``pos`` (B,) counts the tokens each row has read, and ``model_id`` is the fingerprint of the
weights that made the state. States are never modified in place: methods and model calls
return new ones. Saving and loading are the same for every family.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import RwkvpyError
from ..io import atomic_write, read_safetensors

STATE_FORMAT = "rwkvpy-state"
STATE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class RecurrentState:
    """Base of typed states. Subclasses declare their tensors, then ``pos`` and ``model_id``."""

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model_id"}

    @staticmethod
    def batch_dim(name: str) -> int:
        return 0 if name == "pos" else 1

    def _map(self, fn):
        """A new state of fn(name, tensor, batch_dim) for every tensor."""
        return type(self)(**{k: fn(k, v, self.batch_dim(k)) for k, v in self.tensors().items()},
                          model_id=self.model_id)

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def n_layer(self) -> int:
        return next(v for k, v in self.tensors().items() if k != "pos").shape[0]

    def clone(self):
        return self._map(lambda k, v, d: v.clone())

    def to(self, device):
        return self._map(lambda k, v, d: v.to(device))

    def select(self, rows):
        """Rows of the batch: an int, a slice, a list or a tensor of indices (keeps the batch dim)."""
        if isinstance(rows, int):
            rows = [rows]
        return self._map(lambda k, v, d: v[rows] if d == 0 else v[:, rows])

    @classmethod
    def concat(cls, states: list):
        """Stack several states along the batch dimension (all from the same model)."""
        if len({type(s) for s in states}) > 1 or len({s.model_id for s in states}) > 1:
            raise RwkvpyError("cannot concatenate states of different models")
        first = states[0]
        return first._map(lambda k, v, d: torch.cat([getattr(s, k) for s in states], dim=d))

    def save(self, path: str | os.PathLike, text: str | None = None) -> None:
        """Write the state (and optionally the text it has read) to a safetensors file, atomically."""
        if not self.model_id:
            raise RwkvpyError("this state does not know its model; create states with model.zero_state()")
        meta = {
            "format": STATE_FORMAT,
            "format_version": str(STATE_FORMAT_VERSION),
            "state_type": type(self).__name__,
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
    path = Path(path)
    tensors, meta = read_safetensors(path)
    if meta.get("format") != STATE_FORMAT:
        raise RwkvpyError(f"{path}: not an rwkvpy state file")
    if meta.get("format_version") != str(STATE_FORMAT_VERSION):
        raise RwkvpyError(f"{path}: state format version {meta.get('format_version')!r} is not supported")
    return tensors, meta


def load_state(path: str | os.PathLike, model) -> RecurrentState:
    """A state saved by ``state.save``, checked against the model it is loaded into."""
    return load_state_and_metadata(path, model)[0]


def load_state_and_metadata(path: str | os.PathLike, model) -> tuple[RecurrentState, dict[str, str]]:
    """The state and the file's metadata (``text``, ``tokens_consumed``, ...)."""
    tensors, meta = read_state_file(path)
    saved, ours = meta.get("model_fingerprint", ""), model.fingerprint
    if saved != ours:
        raise RwkvpyError(
            f"{path}: state was saved from a different model (fingerprint {saved[:12]}, "
            f"this model is {ours[:12]})"
        )
    expected = model.zero_state(1)
    kind = meta.get("state_type", type(expected).__name__)
    if kind != type(expected).__name__:
        raise RwkvpyError(f"{path}: holds a {kind}, this model's state is a {type(expected).__name__}")
    names = list(expected.tensors())
    if sorted(tensors) != sorted(names):
        raise RwkvpyError(f"{path}: state has tensors {sorted(tensors)}, expected {sorted(names)}")
    for name in names:
        got, want = tensors[name], getattr(expected, name)
        batch_dim = expected.batch_dim(name)
        shape_ok = got.dim() == want.dim() and all(
            a == b for i, (a, b) in enumerate(zip(got.shape, want.shape)) if i != batch_dim
        )
        if not shape_ok or got.dtype != want.dtype:
            raise RwkvpyError(f"{path}: state tensor {name!r} has shape {tuple(got.shape)} {got.dtype}, "
                              f"expected {tuple(want.shape)} {want.dtype} (batch may differ)")
    state = type(expected)(**{k: v.to(model.device) for k, v in tensors.items()}, model_id=ours)
    return state, meta
