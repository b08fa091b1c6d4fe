"""Model families, each one file with its config, typed state, key names and shapes, all
implementing the interface of :mod:`rwkvpy.models.base`."""

from .base import ModelBase, weights_fingerprint
from .gpt import GPT, GPTConfig
from .rwkv4 import (PROJECTIONS, RWKV4, RWKV4Config, RWKV4State, build_model, official_init, parameter_shapes,
                    random_state_dict)
from .state import RecurrentState, load_state, load_state_and_metadata

__all__ = ["ModelBase", "RecurrentState", "RWKV4Config", "RWKV4", "RWKV4State", "GPT", "GPTConfig",
           "PROJECTIONS", "build_model", "official_init", "parameter_shapes", "random_state_dict",
           "load_state", "load_state_and_metadata", "weights_fingerprint"]
