"""Long input: 20,000 tokens through the parallel form and through the recurrent form."""

import pytest
import torch

from conftest import SHAPES, make_model, rel_err

N = 20_000


@pytest.mark.slow
@torch.no_grad()
def test_20k_tokens_chunked_equals_step():
    cfg = SHAPES["small"]
    model = make_model(cfg, seed=5)
    toks = torch.randint(0, cfg.vocab_size, (1, N), generator=torch.Generator().manual_seed(0))
    logits, state = model(toks, last_only=True)
    s = None
    for t in range(N):
        row, s = model.step(toks[:, t], s)
    assert torch.isfinite(logits).all() and torch.isfinite(row).all()
    assert torch.equal(state.pos, s.pos) and state.pos.item() == N
    for name in ("att_x", "ffn_x", "num", "den", "max"):
        assert rel_err(getattr(s, name), getattr(state, name)) < 1e-4, name
    assert rel_err(row, logits[:, -1]) < 1e-4


@pytest.mark.slow
@torch.no_grad()
def test_20k_tokens_parallel_form_memory_is_bounded():
    """All 20k positions at once: finite logits everywhere, and the same as two halves."""
    cfg = SHAPES["odd"]
    model = make_model(cfg, seed=6)
    toks = torch.randint(0, cfg.vocab_size, (1, N), generator=torch.Generator().manual_seed(1))
    logits, state = model(toks)
    assert torch.isfinite(logits).all()
    first, s = model(toks[:, : N // 2])
    second, s = model(toks[:, N // 2 :], s)
    assert rel_err(torch.cat([first, second], 1), logits) < 1e-5
