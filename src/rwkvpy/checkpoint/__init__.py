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

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..models import build_model
from ..ops.quant import is_quantized
from .hf import hf_layer_norm_eps, is_hf_folder, read_hf, write_hf
from .keys import detect_family, infer_config, validate
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


def read_checkpoint(path: str | os.PathLike) -> tuple[object, dict[str, Tensor], str]:
    """(config, tensors in official names and shapes, format name) of any supported format."""
    fmt = detect_format(path)
    source = str(path)
    if fmt == "native":
        cfg, sd = read_native(path)
        if cfg.arch in ("rwkv4", "rwkv7"):  # a file that says RWKV but holds another generation
            detect_family(sd, source)
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


def write_checkpoint(cfg, sd: dict[str, Tensor], path, fmt: str) -> None:
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


def describe_checkpoint(cfg, sd) -> str:
    n = sum(t.numel() for t in sd.values())
    if cfg.arch == "rwkv7":
        shape = (f"RWKV-7, {cfg.n_layer} layers, n_embd {cfg.n_embd} ({cfg.n_head} heads of {cfg.head_size}), "
                 f"dim_ffn {cfg.dim_ffn}, LoRA ranks w {cfg.d_decay} / a {cfg.d_aaa} / v {cfg.d_mv} / g {cfg.d_gate}")
    else:
        shape = f"RWKV-4, {cfg.n_layer} layers, n_embd {cfg.n_embd}, dim_att {cfg.dim_att}, dim_ffn {cfg.dim_ffn}"
    return f"{shape}, vocab {cfg.vocab_size}, {n:,} parameters"


def probe_tokens(vocab_size: int, length: int = 32) -> Tensor:
    """A fixed token sequence for comparing two models' logits."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (1, length), generator=g)


@torch.no_grad()
def convert_checkpoint(src, dst, fmt: str) -> dict:
    """Write ``src`` in format ``fmt`` at ``dst``, read it back and prove it is the same model:
    every tensor compared, and both models' fp32 logits on a probe sequence. Formats only
    rename tensors, so anything beyond fp32 rounding is a broken conversion (an error). The one
    exception: an RWKV-7 trainer's file keeps layer 0's value LoRA, which no computation uses and
    the Hugging Face layout has no place for; it is left out (``left_out`` counts them)."""
    cfg, sd, src_fmt = read_checkpoint(src)
    write_checkpoint(cfg, sd, dst, fmt)
    cfg2, sd2, _ = read_checkpoint(dst)
    left_out = [k for k in sd if k not in sd2]
    if left_out and getattr(cfg, "layer0_value_lora", False) and not cfg2.layer0_value_lora:
        cfg = replace(cfg, layer0_value_lora=False)
        sd = {k: v for k, v in sd.items() if k in sd2}
    same = sum(k in sd2 and torch.equal(sd[k], sd2[k]) and sd[k].dtype == sd2[k].dtype for k in sd)
    tokens = probe_tokens(cfg.vocab_size)
    a, _ = build_model(cfg, sd)(tokens)
    b, _ = build_model(cfg2, sd2)(tokens)
    diff, scale = (a - b).abs().max().item(), a.abs().max().item()
    if cfg2 != cfg or not diff <= 1e-6 * max(1.0, scale):
        raise CheckpointError(f"{dst}: conversion changed the model (max logit difference {diff:.3g})")
    return {"config": cfg, "state_dict": sd, "source_format": src_fmt, "identical": same, "tensors": len(sd),
            "left_out": left_out, "max_logit_diff": diff, "probe_tokens": tokens.shape[1]}


__all__ = ["FORMATS", "convert_checkpoint", "describe_checkpoint", "probe_tokens", "detect_format", "read_checkpoint", "write_checkpoint", "read_pth", "write_pth",
           "read_hf", "write_hf", "read_native", "save_native"]
