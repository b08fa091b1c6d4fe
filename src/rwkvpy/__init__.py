"""rwkvpy: RWKV language models in plain PyTorch, parallel and recurrent forms of one model.

    model = rwkvpy.load("RWKV-4-Pile-169M.pth")          # RWKV-4 or -7; .pth, HF folder, rwkvpy's format
    logits, state = model(tokens)                         # parallel form, tokens (B, T)
    logits, state = model.step(next_tokens, state)        # recurrent form, one token per row
"""

from .errors import CheckpointError, RwkvpyError
from .generation import ChatSession, SamplingParams, generate
from .loading import load, save
from .models import RWKV4, RWKV7, RWKV4Config, RWKV4State, RWKV7Config, RWKV7State, load_state
from .tokenizers import load_tokenizer

__version__ = "0.1.0"
__all__ = ["load", "save", "load_tokenizer", "load_state", "generate", "SamplingParams", "ChatSession", "RWKV4",
           "RWKV4Config", "RWKV4State", "RWKV7", "RWKV7Config", "RWKV7State", "RwkvpyError", "CheckpointError"]
