"""The GPT baseline decoded as an RNN whose state grows (a KV cache): the same logits as the
full forward, in float64, token by token and in any split; greedy generation works."""

import pytest
import torch

from conftest import rel_err
from rwkvpy import RwkvpyError
from rwkvpy.models.gpt import GPT, GPTConfig

CFG = GPTConfig(vocab_size=50, n_layer=3, n_head=4, n_embd=32, block_size=64)


def model64():
    return GPT(CFG, seed=1).double().eval().requires_grad_(False)


@torch.no_grad()
def test_kv_cache_decoding_equals_the_full_forward_float64():
    model = model64()
    toks = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(0))
    full, _ = model(toks)
    rows, state = [], None
    for t in range(40):
        row, state = model.step(toks[:, t], state)
        rows.append(row)
    assert rel_err(torch.stack(rows, 1), full) < 1e-10
    assert state.k.shape == (3, 2, 4, 40, 8) and state.pos.tolist() == [40, 40]


@torch.no_grad()
@pytest.mark.parametrize("splits", [[1], [17], [5, 6, 30]])
def test_any_split_with_the_cache_carried(splits):
    model = model64()
    toks = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(1))
    full, _ = model(toks)
    parts, state, prev = [], None, 0
    for cut in splits + [40]:
        out, state = model(toks[:, prev:cut], state)
        parts.append(out)
        prev = cut
    assert rel_err(torch.cat(parts, 1), full) < 1e-10


@torch.no_grad()
def test_greedy_generation_and_limits():
    from rwkvpy.generation import generate
    from rwkvpy.tokenizers.byte import ByteTokenizer

    model = GPT(GPTConfig(vocab_size=256, n_layer=2, n_head=2, n_embd=16, block_size=32)).eval()
    gen = generate(model, ByteTokenizer(), "ab", max_new_tokens=10, temperature=0)
    gen.run()
    assert len(gen.tokens) == 10
    ids = torch.tensor([[97, 98] + gen.tokens[:-1]])
    assert model(ids)[0][0].argmax(-1)[1:].tolist() == gen.tokens  # each token the full forward's argmax
    with pytest.raises(RwkvpyError, match="learned positions"):
        model(torch.zeros(1, 33, dtype=torch.long))


def evaluations_closed_form(L: int, j: int) -> int:
    """N_0 = 1, N_l(j) = 1 + N_{l-1}(j) + sum_{i<=j} N_{l-1}(i) (the issue's recurrence)."""
    N = [1] * (j + 1)
    for _ in range(L):
        N = [1 + N[p] + sum(N[: p + 1]) for p in range(j + 1)]
    return N[j]


@torch.no_grad()
def test_recompute_decoding_equals_kv_cache_and_full_forward_float64():
    from rwkvpy.models.gpt import RecomputeDecoder

    model = model64()
    toks = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(3))
    full, _ = model(toks)
    dec, state = RecomputeDecoder(model), None
    for t in range(9):
        before = dec.evaluations
        logits = dec.step(int(toks[0, t]))
        assert dec.evaluations - before == evaluations_closed_form(CFG.n_layer, t)  # nothing cached
        cached, state = model.step(toks[:, t], state)
        assert rel_err(logits, full[0, t]) < 1e-10 and rel_err(logits, cached[0]) < 1e-10
        assert logits.argmax() == cached[0].argmax()
    assert dec.ids == toks[0].tolist()


@torch.no_grad()
def test_recompute_memory_is_flat_in_t():
    import tracemalloc

    from rwkvpy.models.gpt import RecomputeDecoder

    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=64), seed=0).eval()
    dec = RecomputeDecoder(model)
    peaks = []
    for t in range(40):
        tracemalloc.start()
        dec.step(t % 50)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert max(peaks[30:]) <= 1.2 * max(peaks[5:10]) + 4096  # flat, not growing with t
    # tracemalloc sees Python objects, not torch's buffers: between steps the decoder holds no
    # tensor at all, only the ids (the frames live on the stack of one step, one per layer)
    assert not [k for k, v in vars(dec).items() if isinstance(v, torch.Tensor)] and len(dec.ids) == 40


def test_trained_gpt_saves_loads_and_generates_both_ways(tmp_path):
    """Train a tiny GPT, load its saved model, generate with the KV cache and by recomputation."""
    import subprocess
    import sys

    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question. " * 30)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "rwkvpy", "train", "--data", corpus, "--out", out, "--arch", "gpt",
                        "--n-layer=2", "--n-embd=16", "--n-head=2", "--ctx-len=16", "--batch-size=4",
                        "--max-iters=6", "--eval-interval=3", "--eval-windows=4", "--precision=fp32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    texts = []
    for decode in ("state", "recompute"):
        r = subprocess.run([sys.executable, "-m", "rwkvpy", "generate", "--model", out / "model", "to be",
                            "--max-tokens", "6", "--temperature", "0", "--decode", decode],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        texts.append(r.stdout)
    assert texts[0] == texts[1] and len(texts[0]) > 1
