"""Official key names and shapes (RWKV-4, RWKV-7): the family and config from tensors, and checks.

Every format is read into the official names (BlinkDL RWKV-LM), checked here once, and
written from them: conversion between formats is a renaming, never a change of values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from ..errors import CheckpointError, RwkvpyError
from ..models import RWKV4Config, RWKV7Config, parameter_shapes, projections
from ..ops.quant import SCALE_SUFFIX, is_quantized

# Key fragments of generations and variants rwkvpy does not run (checked before anything
# else, so the message names the real problem instead of a list of missing keys).
_NOT_SUPPORTED = [
    ("RWKV-7a (DeepEmbed) checkpoint", (".ffn.s_emb.", ".ffn.s_emb_x.")),
    ("RWKV-7b checkpoint (attention blocks)", (".qkv.",)),
    ("RWKV-6 checkpoint", (".att.time_maa", ".att.time_faaaa", ".ffn.time_maa")),
    ("RWKV-5 checkpoint", (".att.gate.",)),
]
_RWKV7_KEYS = (".att.r_k", ".att.k_k", ".att.w0", ".att.x_r")


def detect_family(keys, source: str) -> str:
    """``rwkv4`` or ``rwkv7`` from the key names; other generations are refused by name."""
    keys = list(keys)
    for name, fragments in _NOT_SUPPORTED:
        for key in keys:
            if any(f in key for f in fragments):
                raise CheckpointError(f"{source}: this is an {name} (found key {key!r}); "
                                      "rwkvpy runs RWKV-4 and RWKV-7 checkpoints")
    if any(k.endswith(_RWKV7_KEYS) for k in keys):
        return "rwkv7"
    rwkv5 = next((k for k in keys if ".att.ln_x." in k), None)  # RWKV-7 has ln_x too: checked after
    if rwkv5:
        raise CheckpointError(f"{source}: this is an RWKV-5 checkpoint (found key {rwkv5!r}); "
                              "rwkvpy runs RWKV-4 and RWKV-7 checkpoints")
    return "rwkv4"


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _require(sd: Mapping[str, Tensor], keys, dims: int, source: str, family: str) -> None:
    for key in keys:
        if key not in sd:
            sample = ", ".join(repr(k) for k in list(sd)[:5]) or "no keys"
            raise CheckpointError(f"{source}: missing key {key!r}: not an {family} checkpoint (first keys: {sample})")
        if sd[key].dim() != dims:
            raise CheckpointError(f"{source}: key {key!r} has shape {_shape(sd[key])}, expected {dims}-D")


def _n_layer(sd: Mapping[str, Tensor]) -> int:
    return max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))) + 1


def infer_config(sd: Mapping[str, Tensor], source: str):
    """Read the shapes of the model off its tensors (never off a file name)."""
    if detect_family(sd.keys(), source) == "rwkv7":
        return _infer_rwkv7(sd, source)
    _require(sd, ("emb.weight", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight"), 2, source, "RWKV-4")
    V, C = _shape(sd["emb.weight"])
    return RWKV4Config(
        vocab_size=V,
        n_embd=C,
        n_layer=_n_layer(sd),
        dim_att=_shape(sd["blocks.0.att.key.weight"])[0],
        dim_ffn=_shape(sd["blocks.0.ffn.key.weight"])[0],
    )


def _infer_rwkv7(sd: Mapping[str, Tensor], source: str) -> RWKV7Config:
    """Heads from r_k (H, N); LoRA ranks from w1, a1, g1 and the first v1 present."""
    loras = ("blocks.0.att.w1", "blocks.0.att.a1", "blocks.0.att.g1")
    _require(sd, ("emb.weight", "blocks.0.att.r_k", "blocks.0.ffn.key.weight") + loras, 2, source, "RWKV-7")
    V, C = _shape(sd["emb.weight"])
    H, N = _shape(sd["blocks.0.att.r_k"])
    n_layer = _n_layer(sd)
    v1 = next((f"blocks.{i}.att.v1" for i in range(n_layer) if f"blocks.{i}.att.v1" in sd), None)
    try:
        return RWKV7Config(
            vocab_size=V, n_embd=C, n_layer=n_layer, head_size=N,
            dim_ffn=_shape(sd["blocks.0.ffn.key.weight"])[0],
            d_decay=_shape(sd[loras[0]])[1], d_aaa=_shape(sd[loras[1]])[1], d_gate=_shape(sd[loras[2]])[1],
            d_mv=_shape(sd[v1])[1] if v1 else None,
            layer0_value_lora="blocks.0.att.v1" in sd,
        )
    except RwkvpyError as e:
        raise CheckpointError(f"{source}: {e} (r_k has shape {(H, N)})") from None


_NAMES = {"rwkv4": "RWKV-4", "rwkv7": "RWKV-7"}


def validate(sd: Mapping[str, Tensor], cfg: RWKV4Config, source: str) -> dict[str, Tensor]:
    """Check keys, shapes and dtypes; return the tensors in official order and shapes.

    Per-channel vectors stored with extra unit dimensions (``time_decay`` as (1, A), say)
    are reshaped to the official shape; the values are untouched. An int8 checkpoint has
    int8 projections, each with its per-row scales under ``<key>_scale``.
    """
    shapes = parameter_shapes(cfg)
    matrices = projections(cfg)
    quantized = is_quantized(sd)
    if quantized:
        for key in [k for k in shapes if k.endswith(matrices)]:
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
            f"{source}: unexpected key {unexpected[0]!r}{more} for an {_NAMES[cfg.arch]} model with "
            f"{cfg.n_layer} layers"
        )
    out = {}
    for key, shape in shapes.items():
        t = sd[key]
        if quantized and key.endswith(matrices):
            if t.dtype != torch.int8:
                raise CheckpointError(f"{source}: key {key!r} has dtype {t.dtype}, expected int8 "
                                      f"(the checkpoint has {key + SCALE_SUFFIX!r})")
        elif not t.is_floating_point():
            raise CheckpointError(f"{source}: key {key!r} has dtype {t.dtype}, expected floating point")
        if _shape(t) != shape:
            squeezable = len(shape) <= 3 and t.numel() == shape[-1] and max(shape) == t.numel()
            if not squeezable:
                raise CheckpointError(f"{source}: key {key!r} has shape {_shape(t)}, expected {shape} ({cfg})")
            t = t.reshape(shape)
        out[key] = t
    return out

