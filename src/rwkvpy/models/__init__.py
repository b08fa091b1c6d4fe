"""Model definitions, their configs and their recurrent states."""

from .config import RWKV4Config
from .rwkv4 import RWKV4, build_model, random_state_dict
from .state import RWKV4State

__all__ = ["RWKV4Config", "RWKV4", "RWKV4State", "build_model", "random_state_dict"]
