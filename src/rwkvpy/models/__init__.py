"""Model families, each one file with its config, typed state, key names and shapes, all
implementing the interface of :mod:`rwkvpy.models.base`. The functions here dispatch on a
config's ``arch``, so callers never ask which family they hold."""

from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from . import gpt, retnet, rwkv4, rwkv7
from .base import ModelBase, weights_fingerprint
from .gpt import GPT, GPTConfig
from .rwkv4 import RWKV4, RWKV4Config, RWKV4State
from .retnet import RetNet, RetNetConfig, RetNetState
from .rwkv7 import RWKV7, RWKV7Config, RWKV7State
from .state import RecurrentState, load_state, load_state_and_metadata

# The families that load from checkpoints, by the ``arch`` of their config.
FAMILIES: dict[str, ModuleType] = {"rwkv4": rwkv4, "rwkv7": rwkv7, "retnet": retnet, "gpt": gpt}
CONFIGS = {"rwkv4": RWKV4Config, "rwkv7": RWKV7Config, "retnet": RetNetConfig, "gpt": GPTConfig}


def family(cfg) -> ModuleType:
    """The module of a config's family (its ``build_model``, ``parameter_shapes``, ...)."""
    return FAMILIES[cfg.arch]


def config_from_dict(d: dict[str, Any]):
    """A config from its ``to_dict`` form (files written before RWKV-7 have no arch: RWKV-4)."""
    arch = d.get("arch", "rwkv4")
    if arch not in CONFIGS:
        raise CheckpointError(f"config: unknown arch {arch!r}; rwkvpy loads {', '.join(CONFIGS)}")
    return CONFIGS[arch].from_dict(d)


def build_model(cfg, sd: dict[str, Tensor], dtype=torch.float32, device="cpu", quantize: str | None = None):
    return family(cfg).build_model(cfg, sd, dtype=dtype, device=device, quantize=quantize)


def parameter_shapes(cfg) -> dict[str, tuple[int, ...]]:
    return family(cfg).parameter_shapes(cfg)


def projections(cfg) -> tuple[str, ...]:
    """Key suffixes of the matrices that multiply activations (what int8 quantizes)."""
    return family(cfg).PROJECTIONS


def random_state_dict(cfg, seed: int = 0, dtype=torch.float32) -> dict[str, Tensor]:
    return family(cfg).random_state_dict(cfg, seed=seed, dtype=dtype)


def official_init(cfg, seed: int = 0) -> dict[str, Tensor]:
    return family(cfg).official_init(cfg, seed=seed)


__all__ = ["ModelBase", "RecurrentState", "RWKV4Config", "RWKV4", "RWKV4State", "RWKV7Config", "RWKV7",
           "RWKV7State", "RetNet", "RetNetConfig", "RetNetState", "GPT", "GPTConfig", "FAMILIES", "family", "config_from_dict", "build_model",
           "official_init", "parameter_shapes", "projections", "random_state_dict", "load_state",
           "load_state_and_metadata", "weights_fingerprint"]
