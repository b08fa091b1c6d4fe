import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Shared corpora and tokenizer files: ../shared/data beside the project, or RWKVPY_SHARED_DATA.
SHARED_DATA = Path(os.environ.get("RWKVPY_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# The official package reads these at import time: plain PyTorch, no JIT, no CUDA build.
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")
# Kernel plans measured by the tests go to a folder of their own, never the user's cache.
os.environ["RWKVPY_CACHE_DIR"] = tempfile.mkdtemp(prefix="rwkvpy-test-cache-")
atexit.register(shutil.rmtree, os.environ["RWKVPY_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from rwkvpy.models import RWKV4Config, build_model, random_state_dict  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|: the error relative to the tensor's scale."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


# Shapes for model tests: square, odd widths, non-4x FFN, dim_att != n_embd.
SHAPES = {
    "small": RWKV4Config(vocab_size=97, n_embd=32, n_layer=2),
    "odd": RWKV4Config(vocab_size=61, n_embd=37, n_layer=3, dim_ffn=101),
    "ffn35": RWKV4Config(vocab_size=128, n_embd=48, n_layer=2, dim_ffn=168),
}
SHAPE_ATT = RWKV4Config(vocab_size=50, n_embd=40, n_layer=2, dim_att=24, dim_ffn=72)


@pytest.fixture(params=list(SHAPES), ids=list(SHAPES))
def cfg(request) -> RWKV4Config:
    return SHAPES[request.param]


def make_model(cfg: RWKV4Config, seed: int = 0, dtype=torch.float32):
    return build_model(cfg, random_state_dict(cfg, seed=seed), dtype=dtype)


def logits_both_forms(model, tokens):
    """(logits of the whole sequence in one call, the same token by token), both (B, T, V)."""
    with torch.no_grad():
        whole, _ = model(tokens)
        rows, state = [], None
        for t in range(tokens.shape[1]):
            row, state = model.step(tokens[:, t], state)
            rows.append(row)
    return whole, torch.stack(rows, 1)


def run_steps(model, toks, state=None):
    """The recurrent form over toks (B, T), token by token: (logits (B, T, V), final state)."""
    rows = []
    for t in range(toks.shape[1]):
        row, state = model.step(toks[:, t], state)
        rows.append(row)
    return torch.stack(rows, 1), state


def assert_states_close(a, b, tol):
    """Same positions, and every tensor of two states within ``tol`` (relative to its scale)."""
    assert torch.equal(a.pos, b.pos)
    for (name, x), y in zip(a.tensors().items(), b.tensors().values()):
        if name != "pos":
            assert rel_err(x, y) <= tol, name
