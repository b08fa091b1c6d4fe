"""RWKV-7 logits against the official ``rwkv`` package (0.8.32, ``cpu fp32``) on random x070
checkpoints built here, both its sequence mode and its one-token mode against both of ours.

The package swaps in its RWKV-7 class for the whole process when ``RWKV_V7_ON=1`` is set
before import, so it runs in a subprocess (tests/models/official_rwkv7.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rwkvpy
from rwkvpy.checkpoint import write_pth
from rwkvpy.models.rwkv7 import RWKV7Config, random_state_dict

TOL = 1e-4
PROMPT_LEN = 48
ORACLE = Path(__file__).with_name("official_rwkv7.py")
SHAPES = {
    # C not a multiple of 128, odd LoRA ranks
    "c192-odd-ranks": RWKV7Config(vocab_size=100, n_embd=192, n_layer=3, d_decay=17, d_aaa=9, d_mv=5, d_gate=13),
    # a trainer's file: layer 0 keeps its (unused) value LoRA
    "c128-layer0-v": RWKV7Config(vocab_size=77, n_embd=128, n_layer=2, d_decay=32, d_aaa=32, d_mv=32, d_gate=32,
                                 layer0_value_lora=True),
    # the official default ranks for C=256 and a 3.5x FFN
    "c256-ffn35": RWKV7Config(vocab_size=300, n_embd=256, n_layer=2, dim_ffn=896),
}


def official_logits(path: Path, tokens: list[int], out: Path) -> dict:
    env = dict(os.environ, RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
    proc = subprocess.run([sys.executable, str(ORACLE), str(path), json.dumps(tokens), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("name", list(SHAPES))
def test_against_official_rwkv_package(name, tmp_path):
    cfg = SHAPES[name]
    path = tmp_path / "model.pth"
    write_pth(random_state_dict(cfg, seed=3), path)
    toks = torch.randint(0, cfg.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(42))
    theirs = official_logits(path, toks.tolist(), tmp_path / "out.pt")
    model = rwkvpy.load(path)
    assert model.config == cfg
    with torch.no_grad():
        parallel = model(toks[None])[0][0]
        rows, state = [], None
        for t in toks:
            row, state = model.step(t[None], state)
            rows.append(row[0])
    for ours in (parallel, torch.stack(rows)):
        for mode in ("sequence", "one"):
            assert (ours - theirs[mode]).abs().max().item() <= TOL, mode
