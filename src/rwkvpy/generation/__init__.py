"""Sampling, the generation loop and chat."""

from .chat import FORMATS, ChatFormat, ChatSession
from .loop import Generation, generate, prefill
from .sampling import SamplingParams, sample

__all__ = ["SamplingParams", "sample", "Generation", "generate", "prefill", "ChatSession", "ChatFormat",
           "FORMATS"]
