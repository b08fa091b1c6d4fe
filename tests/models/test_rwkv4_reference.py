"""Logits against the official implementations on random checkpoints built here.

Oracles: the ``rwkv`` pip package (BlinkDL, 0.8.32; ``cpu fp32``, JIT and CUDA off, set in
conftest) and ``transformers.RwkvForCausalLM`` with ``rescale_every=0``. Both forms of
rwkvpy are compared with both forms of each oracle over a 64-token prompt.
"""

import pytest
import torch

import rwkvpy
from conftest import SHAPE_ATT, SHAPES
from rwkvpy.checkpoint import write_hf, write_pth
from rwkvpy.models import random_state_dict

TOL = 1e-4
PROMPT_LEN = 64
ALL_SHAPES = {**SHAPES, "att24": SHAPE_ATT}


def prompt(cfg):
    return torch.randint(0, cfg.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(42))


@torch.no_grad()
def ours_both_forms(model, toks):
    parallel, _ = model(toks[None])
    rows, state = [], None
    for t in toks:
        row, state = model.step(t[None], state)
        rows.append(row[0])
    return parallel[0], torch.stack(rows)


@pytest.mark.parametrize("name", list(ALL_SHAPES))
def test_against_official_rwkv_package(name, tmp_path):
    from rwkv.model import RWKV

    cfg = ALL_SHAPES[name]
    path = tmp_path / "model.pth"
    write_pth(random_state_dict(cfg, seed=3), path)
    official = RWKV(str(path), "cpu fp32", verbose=False)
    assert official.version == 4
    toks = prompt(cfg)
    with torch.no_grad():
        rows, state = [], None
        for t in toks.tolist():
            row, state = official.forward([t], state)
            rows.append(row)
        oracles = [torch.stack(rows)]
        # Its sequence mode writes the WKV output into an n_embd-wide buffer, so it only
        # runs when dim_att == n_embd; its one-token mode handles every shape.
        if cfg.dim_att == cfg.n_embd:
            oracles.append(official.forward(toks.tolist(), None, full_output=True)[0])
    parallel, recurrent = ours_both_forms(rwkvpy.load(path), toks)
    for ours in (parallel, recurrent):
        for theirs in oracles:
            assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("name", list(ALL_SHAPES))
def test_against_transformers_reading_our_folder(name, tmp_path):
    from transformers import RwkvForCausalLM

    cfg = ALL_SHAPES[name]
    write_hf(cfg, random_state_dict(cfg, seed=4), tmp_path)
    hf = RwkvForCausalLM.from_pretrained(tmp_path, rescale_every=0).eval()
    toks = prompt(cfg)
    with torch.no_grad():
        hf_parallel = hf(toks[None], use_cache=False).logits[0]
    parallel, recurrent = ours_both_forms(rwkvpy.load(tmp_path), toks)
    assert (parallel - hf_parallel).abs().max().item() <= TOL
    assert (recurrent - hf_parallel).abs().max().item() <= TOL
    if cfg.dim_att == cfg.n_embd:  # HF's cached state is n_embd wide: its RNN mode needs this
        rows, state = [], None
        with torch.no_grad():
            for t in toks:
                out = hf(t.view(1, 1), state=state, use_cache=True)
                rows.append(out.logits[0, 0])
                state = out.state
        hf_recurrent = torch.stack(rows)
        assert (parallel - hf_recurrent).abs().max().item() <= TOL
        assert (recurrent - hf_recurrent).abs().max().item() <= TOL


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_reads_a_folder_written_by_transformers(tmp_path, safe_serialization):
    """A folder made by transformers itself (its own init, names and file layout)."""
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(0)
    hf_cfg = RwkvConfig(vocab_size=80, hidden_size=36, num_hidden_layers=3, intermediate_size=100,
                        context_length=128, rescale_every=0)
    hf = RwkvForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    model = rwkvpy.load(tmp_path)
    assert model.config.dim_ffn == 100 and model.config.n_layer == 3
    toks = torch.randint(0, 80, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(toks[None]).logits[0]
    for ours in ours_both_forms(model, toks):
        assert (ours - theirs).abs().max().item() <= TOL
