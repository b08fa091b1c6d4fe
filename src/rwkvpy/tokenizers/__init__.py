"""Tokenizers behind one interface: ``encode``, ``decode``, ``decode_bytes``, ``vocab_size``.

    bytes   plain UTF-8 bytes (vocabulary 256), built in
    world   RWKV World (greedy longest match), from an ``rwkv_vocab_v20230424.txt``-style file
    hf      a Hugging Face ``tokenizer.json`` (GPT-NeoX 20B for RWKV-4 Pile / Raven)
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import RwkvpyError
from .base import Tokenizer
from .byte import ByteTokenizer
from .hf import HFTokenizer
from .world import WorldTokenizer

# Which tokenizer a model's vocabulary size implies, and what to pass when none is bundled.
_BY_VOCAB = {
    256: "bytes",
    50277: "the GPT-NeoX 20B tokenizer (pass --tokenizer path/to/20B_tokenizer.json)",
    65536: "the RWKV World tokenizer (pass --tokenizer path/to/rwkv_vocab_v20230424.txt)",
}
# Models pad their vocabulary a little beyond the tokenizer's (World: 65530 -> 65536).
_MAX_PADDING = 128


def load_tokenizer(path_or_name: str | os.PathLike) -> Tokenizer:
    """``"bytes"``, a ``tokenizer.json``, a World vocabulary ``.txt``, or a folder holding one."""
    if str(path_or_name) == "bytes":
        return ByteTokenizer()
    path = Path(path_or_name)
    if path.is_dir():
        found = find_tokenizer_file(path)
        if found is None:
            raise RwkvpyError(f"{path}: folder has no tokenizer.json or World vocabulary (*vocab*.txt)")
        path = found
    if not path.exists():
        raise RwkvpyError(f"{path}: no such tokenizer file (or use 'bytes')")
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.suffix == ".txt":
        return WorldTokenizer(path)
    raise RwkvpyError(f"{path}: unknown tokenizer file type (expected tokenizer.json or a World vocab .txt)")


def find_tokenizer_file(folder: Path) -> Path | None:
    if (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json"
    vocabs = sorted(folder.glob("*vocab*.txt"))
    return vocabs[0] if vocabs else None


def tokenizer_for_model(model_vocab: int, tokenizer: str | os.PathLike | None = None,
                        model_path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer a user asked for, else one in the model's folder, else by vocabulary size.

    A tokenizer whose vocabulary does not fit the model's is an error, not gibberish.
    """
    if tokenizer is None and model_path is not None and Path(model_path).is_dir():
        found = find_tokenizer_file(Path(model_path))
        tokenizer = found if found is not None else None
    if tokenizer is None:
        implied = _BY_VOCAB.get(model_vocab)
        if implied == "bytes":
            return ByteTokenizer()
        need = implied or "a tokenizer (pass --tokenizer FILE)"
        raise RwkvpyError(f"model has vocabulary {model_vocab}: it needs {need}")
    tok = load_tokenizer(tokenizer)
    check_vocab(tok, model_vocab, str(tokenizer))
    return tok


def check_vocab(tok: Tokenizer, model_vocab: int, source: str) -> None:
    if not tok.vocab_size <= model_vocab < tok.vocab_size + _MAX_PADDING:
        raise RwkvpyError(
            f"{source}: tokenizer vocabulary {tok.vocab_size} does not match the model's {model_vocab}"
        )


__all__ = ["Tokenizer", "ByteTokenizer", "WorldTokenizer", "HFTokenizer", "load_tokenizer",
           "tokenizer_for_model", "check_vocab"]
