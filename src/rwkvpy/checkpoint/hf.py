"""Hugging Face RWKV folders: ``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``,
single or sharded (``*.index.json``). Keys are renamed to and from the official ones."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from torch import Tensor

from ..errors import CheckpointError
from ..io import atomic_write_text
from ..models import RWKV4Config
from .pth import read_pth
from ..io import read_safetensors, write_safetensors

# (official, Hugging Face) fragments; applied to whole path components.
_BLOCK_RENAMES = [
    ("ln0.", "pre_ln."),
    ("att.time_mix_k", "attention.time_mix_key"),
    ("att.time_mix_v", "attention.time_mix_value"),
    ("att.time_mix_r", "attention.time_mix_receptance"),
    ("att.", "attention."),
    ("ffn.time_mix_k", "feed_forward.time_mix_key"),
    ("ffn.time_mix_r", "feed_forward.time_mix_receptance"),
    ("ffn.", "feed_forward."),
]
_TOP_RENAMES = [("emb.", "rwkv.embeddings."), ("ln_out.", "rwkv.ln_out."), ("head.", "head.")]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def to_hf_name(key: str) -> str:
    m = re.match(r"blocks\.(\d+)\.(.*)", key)
    if m:
        rest = m.group(2)
        for official, hf in _BLOCK_RENAMES:
            if rest.startswith(official):
                rest = hf + rest[len(official):]
                break
        return f"rwkv.blocks.{m.group(1)}.{rest}"
    for official, hf in _TOP_RENAMES:
        if key.startswith(official):
            return hf + key[len(official):]
    return key


def from_hf_name(key: str) -> str:
    m = re.match(r"rwkv\.blocks\.(\d+)\.(.*)", key)
    if m:
        rest = m.group(2)
        for official, hf in _BLOCK_RENAMES:
            if rest.startswith(hf):
                rest = official + rest[len(hf):]
                break
        return f"blocks.{m.group(1)}.{rest}"
    for official, hf in _TOP_RENAMES:
        if key.startswith(hf):
            return official + key[len(hf):]
    return key


def is_hf_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "model_type" in json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _read_weights(path: Path) -> dict[str, Tensor]:
    return read_safetensors(path)[0] if path.suffix == ".safetensors" else read_pth(path)


def read_hf(folder: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """Official-named tensors and the raw HF config of a folder."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    try:
        hf_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON: {e}") from None
    model_type = hf_cfg.get("model_type")
    if model_type != "rwkv":
        raise CheckpointError(
            f"{cfg_path}: model_type is {model_type!r}; rwkvpy reads RWKV-4 folders (model_type 'rwkv')"
        )
    files = []
    for name in WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError, TypeError):
                raise CheckpointError(f"{index}: not a valid shard index (no 'weight_map')") from None
            files = sorted(set(weight_map.values()))
            break
        if (folder / name).is_file():
            files = [name]
            break
    if not files:
        raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin (or their index)")
    sd: dict[str, Tensor] = {}
    for name in files:
        shard = folder / name
        if not shard.is_file():
            raise CheckpointError(f"{shard}: shard listed in the index is missing")
        sd.update(_read_weights(shard))
    sd = {from_hf_name(k): v for k, v in sd.items()}
    if "head.weight" not in sd and hf_cfg.get("tie_word_embeddings") and "emb.weight" in sd:
        sd["head.weight"] = sd["emb.weight"]
    return sd, hf_cfg


def hf_layer_norm_eps(hf_cfg: dict) -> float:
    return float(hf_cfg.get("layer_norm_epsilon", 1e-5))


def write_hf(cfg: RWKV4Config, sd: dict[str, Tensor], folder: str | os.PathLike,
             max_shard_bytes: int | None = None) -> None:
    """Write a folder that ``transformers.RwkvForCausalLM.from_pretrained`` opens."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_sd = {to_hf_name(k): v for k, v in sd.items()}
    hf_cfg = {
        "architectures": ["RwkvForCausalLM"],
        "model_type": "rwkv",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "attention_hidden_size": cfg.dim_att,
        "intermediate_size": cfg.dim_ffn,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "context_length": 1024,
        "rescale_every": 6,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "use_cache": True,
    }
    meta = {"format": "pt"}
    shards = _split(hf_sd, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(hf_sd, folder / "model.safetensors", meta)
    else:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(shard, folder / name, meta)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in hf_sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(folder / "model.safetensors.index.json", json.dumps(index, indent=2))
    atomic_write_text(folder / "config.json", json.dumps(hf_cfg, indent=2) + "\n")


def _split(sd: dict[str, Tensor], max_bytes: int | None) -> list[dict[str, Tensor]]:
    if not max_bytes:
        return [sd]
    shards, current, size = [], {}, 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    return shards
