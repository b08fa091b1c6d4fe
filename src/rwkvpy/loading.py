"""``rwkvpy.load``: any supported checkpoint in, a ready model out."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import read_checkpoint, save_native
from .errors import RwkvpyError
from .models.rwkv4 import RWKV4, build_model
from .ops.linear import plan_projections
from .ops.plan import kernels_mode

DEFAULT_MODEL = Path(__file__).parent / "data" / "default"


def default_model_path() -> Path:
    """The small byte-level RWKV-4 trained on tinyshakespeare that ships with rwkvpy."""
    if not (DEFAULT_MODEL / "model.safetensors").is_file():
        raise RwkvpyError(f"{DEFAULT_MODEL}: the bundled default model is missing; pass --model")
    return DEFAULT_MODEL


DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp64": torch.float64, "float64": torch.float64,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise RwkvpyError(f"dtype {dtype} is not supported; use one of fp32, bf16, fp16, fp64")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise RwkvpyError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16, fp64") from None


def load(path: str | os.PathLike, device: str | torch.device = "cpu",
         dtype: torch.dtype | str = torch.float32, quantize: str | None = None) -> RWKV4:
    """Load an RWKV-4 model from an official ``.pth``, a Hugging Face folder or rwkvpy's format.

    The format is detected from the path; shapes come from the tensors, which are memory
    mapped, so loading in the checkpoint's own dtype copies nothing. ``dtype`` is how the
    matrices are stored (activations are fp32); ``quantize="int8"`` stores the projections
    as int8 with per-row scales. Raises ``CheckpointError`` (one line naming the file, key
    and shapes) on anything unusable.

    The model is ready for inference: eval mode, and no parameter requires grad, so calls
    build no autograd graph and take the fast no-grad kernels even outside ``torch.no_grad()``
    (``model.requires_grad_(True)`` to fine-tune).

    Projections get the kernels planned for this machine (:mod:`rwkvpy.ops.plan`: timed once,
    checked against float64, cached); ``RWKVPY_KERNELS=safe`` keeps plain ``F.linear``.
    """
    cfg, sd, _ = read_checkpoint(path)
    model = build_model(cfg, sd, dtype=parse_dtype(dtype), device=device, quantize=quantize)
    model.requires_grad_(False)
    if kernels_mode() == "planned":
        plan_projections(model)
    return model


def save(model, path: str | os.PathLike) -> None:
    """Write a model in rwkvpy's own format (a folder: safetensors with the official key names,
    and config.json), atomically; ``rwkvpy.load`` reads it back."""
    save_native(model.config, model.state_dict(), path)
