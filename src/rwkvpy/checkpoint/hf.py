"""Hugging Face folders: ``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``, single
or sharded (``*.index.json``). Keys are renamed to and from the official ones:

    RWKV-4  transformers' ``model_type: rwkv`` (``rwkv.blocks.i.attention.key.weight``, ...)
    RWKV-7  flash-linear-attention's ``model_type: rwkv7`` (``model.layers.i.attn.r_proj.weight``;
            LoRA ``w1, w2, w0`` as ``w_lora.lora.0.weight``, ``.lora.2.weight`` (both transposed)
            and ``.lora.2.bias``; vectors without their unit dimensions)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from torch import Tensor

from ..errors import CheckpointError
from ..io import atomic_write_text
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


# RWKV-7, official -> flash-linear-attention names (whole path components).
_FLA_TOP = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
            "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
_FLA_PARTS = {"att": "attn", "ffn": "ffn", "ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
_FLA_ATT = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
_FLA_LORA = {"0": "lora.2.bias", "1": "lora.0.weight", "2": "lora.2.weight"}
FLA_MODEL_TYPES = ("rwkv7", "rwkv7_fla")


def to_fla_name(key: str) -> tuple[str, bool]:
    """(flash-linear-attention name, whether the tensor is stored transposed there)."""
    if key in _FLA_TOP:
        return _FLA_TOP[key], False
    _, layer, part, name, *rest = key.split(".")
    if part == "att" and re.fullmatch("[wavg][012]", name):
        return f"model.layers.{layer}.attn.{name[0]}_lora.{_FLA_LORA[name[1]]}", name[1] != "0"
    if part == "att" and name in _FLA_ATT:
        name = _FLA_ATT[name]
    return ".".join(["model.layers", layer, _FLA_PARTS[part], name, *rest]), False


def from_fla_name(key: str) -> tuple[str, bool]:
    """(official name, whether to transpose) of a flash-linear-attention key; unknown keys as they are."""
    top = {v: k for k, v in _FLA_TOP.items()}
    if key in top:
        return top[key], False
    m = re.fullmatch(r"model\.layers\.(\d+)\.(\w+)\.(.*)", key)
    if not m:
        return key, False
    layer, part, rest = m.groups()
    parts = {v: k for k, v in _FLA_PARTS.items()}
    if part not in parts:
        return key, False
    lora = re.fullmatch(r"([wavg])_lora\.(lora\.\d\.(?:weight|bias))", rest)
    if part == "attn" and lora:
        num = {v: k for k, v in _FLA_LORA.items()}.get(lora.group(2))
        if num is None:
            return key, False
        return f"blocks.{layer}.att.{lora.group(1)}{num}", num != "0"
    name, _, tail = rest.partition(".")
    if part == "attn":
        name = {v: k for k, v in _FLA_ATT.items()}.get(name, name)
    return ".".join([f"blocks.{layer}", parts[part], name] + ([tail] if tail else [])), False


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
    if model_type != "rwkv" and model_type not in FLA_MODEL_TYPES:
        raise CheckpointError(f"{cfg_path}: model_type is {model_type!r}; rwkvpy reads RWKV-4 folders "
                              f"(model_type 'rwkv') and RWKV-7 ones ({' or '.join(map(repr, FLA_MODEL_TYPES))})")
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
    if model_type == "rwkv":
        sd = {from_hf_name(k): v for k, v in sd.items()}
    else:
        renamed = {}
        for k, v in sd.items():
            name, transposed = from_fla_name(k)
            renamed[name] = v.t().contiguous() if transposed and v.dim() == 2 else v  # LoRA: small
        sd = renamed
    if "head.weight" not in sd and hf_cfg.get("tie_word_embeddings") and "emb.weight" in sd:
        sd["head.weight"] = sd["emb.weight"]
    return sd, hf_cfg


def hf_layer_norm_eps(hf_cfg: dict) -> float:
    return float(hf_cfg.get("layer_norm_epsilon", hf_cfg.get("norm_eps", 1e-5)))


def write_hf(cfg, sd: dict[str, Tensor], folder: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
    """Write a folder that ``transformers.RwkvForCausalLM.from_pretrained`` opens (RWKV-4), or
    flash-linear-attention's ``RWKV7ForCausalLM`` (RWKV-7: layer 0's value LoRA, which no
    computation uses, has no place there and is left out)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.arch == "rwkv7":
        hf_sd, hf_cfg = _to_fla(cfg, sd)
    else:
        hf_sd, hf_cfg = {to_hf_name(k): v for k, v in sd.items()}, _transformers_config(cfg)
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


def _to_fla(cfg, sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
    out = {}
    for key, t in sd.items():
        if key in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
            continue
        name, transposed = to_fla_name(key)
        if transposed:
            t = t.t()
        elif t.dim() == 3 and ".attn.x_" not in name:  # fla keeps only x_r..x_g as (1, 1, C)
            t = t.reshape(-1)
        out[name] = t.contiguous()
    hf_cfg = {
        "architectures": ["RWKV7ForCausalLM"],
        "model_type": "rwkv7",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "head_dim": cfg.head_size,
        "intermediate_size": cfg.dim_ffn,
        "hidden_ratio": cfg.dim_ffn / cfg.n_embd,
        "decay_low_rank_dim": cfg.d_decay,
        "a_low_rank_dim": cfg.d_aaa,
        "v_low_rank_dim": cfg.d_mv,
        "gate_low_rank_dim": cfg.d_gate,
        "norm_eps": cfg.layer_norm_eps,
        "norm_bias": True,
        "norm_first": True,
        "hidden_act": "sqrelu",
        "tie_word_embeddings": False,
        "use_cache": True,
    }
    return out, hf_cfg


def _transformers_config(cfg) -> dict:
    return {
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
