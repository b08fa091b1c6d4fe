"""Pure functions: the math shared by every form and every model."""

from .activation import squared_relu
from .shift import time_mix, token_shift
from .wkv import WkvState, wkv_chunked, wkv_matmul, wkv_reference, wkv_step

__all__ = ["WkvState", "wkv_reference", "wkv_chunked", "wkv_matmul", "wkv_step", "token_shift", "time_mix", "squared_relu"]
