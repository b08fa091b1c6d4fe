"""Checkpoint formats. Everything is read into official key names, checked once, and
written from them:

    pth     official BlinkDL ``.pth`` (a flat dict of tensors)
    hf      Hugging Face RWKV folder (``config.json`` + safetensors or bin, maybe sharded)
    native  rwkvpy's folder (``config.json`` + ``model.safetensors``) or its lone file
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from torch import Tensor

from ..errors import CheckpointError
from ..models.config import RWKV4Config, is_quantized
from .hf import hf_layer_norm_eps, is_hf_folder, read_hf, write_hf
from .keys import detect_other_version, infer_config, validate
from .native import is_native_folder, read_native, save_native
from .pth import read_pth, write_pth

FORMATS = ("native", "hf", "pth")


def detect_format(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        if is_native_folder(path):
            return "native"
        if is_hf_folder(path):
            return "hf"
        raise CheckpointError(
            f"{path}: folder has no config.json of an rwkvpy or Hugging Face model"
        )
    if path.suffix == ".safetensors":
        return "native"
    return "pth"


def read_checkpoint(path: str | os.PathLike) -> tuple[RWKV4Config, dict[str, Tensor], str]:
    """(config, tensors in official names and shapes, format name) of any supported format."""
    fmt = detect_format(path)
    source = str(path)
    if fmt == "native":
        cfg, sd = read_native(path)
        other = detect_other_version(sd)
        if other:
            raise CheckpointError(f"{source}: this is an {other}; rwkvpy runs RWKV-4 checkpoints only")
    elif fmt == "hf":
        sd, hf_cfg = read_hf(path)
        cfg = replace(infer_config(sd, source), layer_norm_eps=hf_layer_norm_eps(hf_cfg))
    else:
        sd = read_pth(path)
        if any(k.startswith("rwkv.") for k in sd):  # a Hugging Face .bin given as a file
            from .hf import from_hf_name

            sd = {from_hf_name(k): v for k, v in sd.items()}
        cfg = infer_config(sd, source)
    return cfg, validate(sd, cfg, source), fmt


def write_checkpoint(cfg: RWKV4Config, sd: dict[str, Tensor], path, fmt: str) -> None:
    if fmt != "native" and is_quantized(sd):
        raise CheckpointError(f"{path}: int8 checkpoints exist only in rwkvpy's format (--to native)")
    if fmt == "native":
        save_native(cfg, sd, path)
    elif fmt == "hf":
        write_hf(cfg, sd, path)
    elif fmt == "pth":
        write_pth(sd, path)
    else:
        raise CheckpointError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


__all__ = ["FORMATS", "detect_format", "read_checkpoint", "write_checkpoint", "read_pth", "write_pth",
           "read_hf", "write_hf", "read_native", "save_native"]
