"""Official BlinkDL ``.pth`` checkpoints: a flat dict of tensors with the official names."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..io import atomic_write


def read_pth(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a ``.pth`` with ``weights_only=True`` (memory-mapped when the file allows it)."""
    path = Path(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # files in the legacy (pre-zip) format cannot be mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: holds Python objects other than tensors; refused "
                "(checkpoints are loaded with weights_only=True)"
            ) from None
        raise CheckpointError(
            f"{path}: cannot read as a PyTorch checkpoint (truncated or corrupt?): {_unpickler_reason(e)}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError) as e:
        if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise CheckpointError(f"{path}: {e.strerror}") from None
        raise CheckpointError(
            f"{path}: cannot read as a PyTorch checkpoint (truncated or corrupt?): {_first_line(e)}"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
    if "_strategy" in obj:
        raise CheckpointError(
            f"{path}: was pre-converted by the rwkv package for strategy {obj['_strategy']!r}; "
            "use the original .pth"
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}, expected a flat dict of tensors"
            )
    return obj


def write_pth(sd: dict[str, Tensor], path: str | os.PathLike) -> None:
    sd = {k: v.contiguous() for k, v in sd.items()}
    atomic_write(path, lambda tmp: torch.save(sd, tmp))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    return text[0].split(". ")[0][:200]


def _unpickler_reason(e: BaseException) -> str:
    """The useful part of torch's long weights-only error message."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = [line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()]
        if rest:
            return rest[0][:200]
    return _first_line(e)
