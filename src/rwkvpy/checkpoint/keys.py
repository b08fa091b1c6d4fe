"""Official RWKV-4 key names and shapes: inferring a config from tensors, and checking them.

Every format is read into the official names (BlinkDL RWKV-LM), checked here once, and
written from them: conversion between formats is a renaming, never a change of values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..models import PROJECTIONS, RWKV4Config, parameter_shapes
from ..ops.quant import SCALE_SUFFIX, is_quantized

# Key fragments that identify other RWKV generations (checked before anything else, so the
# message names the real problem instead of a list of missing keys).
_OTHER_VERSIONS = [
    ("RWKV-7", (".att.r_k", ".att.x_r", ".att.w0", ".att.k_k", ".att.a0")),
    ("RWKV-6", (".att.time_maa", ".att.time_faaaa", ".ffn.time_maa")),
    ("RWKV-5", (".att.ln_x.", ".att.gate.")),
]


def detect_other_version(keys) -> str | None:
    for name, fragments in _OTHER_VERSIONS:
        for key in keys:
            if any(f in key for f in fragments):
                return f"{name} (found key {key!r})"
    return None


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def infer_config(sd: Mapping[str, Tensor], source: str) -> RWKV4Config:
    """Read the shapes of the model off its tensors (never off a file name)."""
    other = detect_other_version(sd.keys())
    if other:
        raise CheckpointError(f"{source}: this is an {other}; rwkvpy runs RWKV-4 checkpoints only")
    for key in ("emb.weight", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight"):
        if key not in sd:
            sample = ", ".join(repr(k) for k in list(sd)[:5]) or "no keys"
            raise CheckpointError(
                f"{source}: missing key {key!r}: not an RWKV-4 checkpoint (first keys: {sample})"
            )
        if sd[key].dim() != 2:
            raise CheckpointError(f"{source}: key {key!r} has shape {_shape(sd[key])}, expected 2-D")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    V, C = _shape(sd["emb.weight"])
    return RWKV4Config(
        vocab_size=V,
        n_embd=C,
        n_layer=max(layers) + 1,
        dim_att=_shape(sd["blocks.0.att.key.weight"])[0],
        dim_ffn=_shape(sd["blocks.0.ffn.key.weight"])[0],
    )


def validate(sd: Mapping[str, Tensor], cfg: RWKV4Config, source: str) -> dict[str, Tensor]:
    """Check keys, shapes and dtypes; return the tensors in official order and shapes.

    Per-channel vectors stored with extra unit dimensions (``time_decay`` as (1, A), say)
    are reshaped to the official shape; the values are untouched. An int8 checkpoint has
    int8 projections, each with its per-row scales under ``<key>_scale``.
    """
    shapes = parameter_shapes(cfg)
    quantized = is_quantized(sd)
    if quantized:
        for key in [k for k in shapes if k.endswith(PROJECTIONS)]:
            shapes[key + SCALE_SUFFIX] = shapes[key][:1]
    for key, value in sd.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{source}: key {key!r} holds a {type(value).__name__}, not a tensor")
    missing = [k for k in shapes if k not in sd]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing key {missing[0]!r}{more}")
    unexpected = sorted(k for k in sd if k not in shapes)
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{source}: unexpected key {unexpected[0]!r}{more} for an RWKV-4 model with "
            f"{cfg.n_layer} layers"
        )
    out = {}
    for key, shape in shapes.items():
        t = sd[key]
        if quantized and key.endswith(PROJECTIONS):
            if t.dtype != torch.int8:
                raise CheckpointError(f"{source}: key {key!r} has dtype {t.dtype}, expected int8 "
                                      f"(the checkpoint has {key + SCALE_SUFFIX!r})")
        elif not t.is_floating_point():
            raise CheckpointError(f"{source}: key {key!r} has dtype {t.dtype}, expected floating point")
        if _shape(t) != shape:
            squeezable = len(shape) <= 3 and t.numel() == shape[-1] and max(shape) == t.numel()
            if not squeezable:
                raise CheckpointError(
                    f"{source}: key {key!r} has shape {_shape(t)}, expected {shape} "
                    f"(vocab_size={cfg.vocab_size}, n_embd={cfg.n_embd}, dim_att={cfg.dim_att}, "
                    f"dim_ffn={cfg.dim_ffn})"
                )
            t = t.reshape(shape)
        out[key] = t
    return out

