"""rwkvpy's own format: a folder with ``model.safetensors`` (official key names) and
``config.json``; the config is also stored in the safetensors metadata, so the file alone
is enough to load."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import Tensor

from ..errors import CheckpointError
from ..io import atomic_write_text
from ..models import config_from_dict
from ..io import read_safetensors, write_safetensors

FORMAT = "rwkvpy"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


def is_native_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _config_from(d: dict, source):
    if d.get("format") != FORMAT:
        raise CheckpointError(f"{source}: not an rwkvpy checkpoint (no \"format\": \"rwkvpy\")")
    version = d.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{source}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    body = {k: v for k, v in d.items() if k not in ("format", "format_version")}
    try:
        return config_from_dict(body)
    except TypeError as e:
        raise CheckpointError(f"{source}: bad config: {e}") from None


def read_native(path: str | os.PathLike) -> tuple[object, dict[str, Tensor]]:
    """A native folder, or a native ``.safetensors`` file on its own."""
    path = Path(path)
    weights = path / WEIGHTS if path.is_dir() else path
    sd, meta = read_safetensors(weights)
    if "rwkvpy_config" in meta:
        try:
            d = json.loads(meta["rwkvpy_config"])
        except json.JSONDecodeError:
            raise CheckpointError(f"{weights}: metadata 'rwkvpy_config' is not valid JSON") from None
        return _config_from(d, weights), sd
    cfg_path = weights.parent / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{weights}: no rwkvpy config in its metadata and no config.json beside it")
    try:
        d = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON: {e}") from None
    return _config_from(d, cfg_path), sd


def save_native(cfg, sd: dict[str, Tensor], folder: str | os.PathLike) -> None:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder")
    d = {"format": FORMAT, "format_version": FORMAT_VERSION, **cfg.to_dict()}
    text = json.dumps(d, indent=2) + "\n"
    write_safetensors(sd, folder / WEIGHTS, {"rwkvpy_config": json.dumps(d)})
    atomic_write_text(folder / "config.json", text)
