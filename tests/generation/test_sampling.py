"""Sampling properties: greedy is argmax, filters keep the top token, bans hold, seeds reproduce."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rwkvpy import RwkvpyError, SamplingParams
from rwkvpy.generation.sampling import Penalties, apply_penalties, ban_tokens, filter_probs, sample

LOGITS = st.builds(
    lambda seed, v, scale: torch.randn(v, generator=torch.Generator().manual_seed(seed)) * scale,
    st.integers(0, 2**31), st.integers(2, 300), st.floats(0.1, 20.0),
)


@settings(max_examples=200, deadline=None)
@given(logits=LOGITS, seed=st.integers(0, 1000))
def test_greedy_and_top_k_1_are_argmax(logits, seed):
    g = torch.Generator().manual_seed(seed)
    assert sample(logits, SamplingParams(temperature=0), g) == logits.argmax()
    assert sample(logits, SamplingParams(temperature=1.7, top_k=1), g) == logits.argmax()


@settings(max_examples=200, deadline=None)
@given(logits=LOGITS, top_p=st.floats(1e-9, 1.0), top_k=st.integers(0, 50), min_p=st.floats(0, 0.99))
def test_filters_keep_at_least_the_top_token(logits, top_p, top_k, min_p):
    probs = torch.softmax(logits, -1)
    kept = filter_probs(probs, top_k, top_p, min_p)
    assert kept[probs.argmax()] > 0
    assert (kept > 0).sum() >= 1
    if top_k:
        assert (kept > 0).sum() <= top_k


@settings(max_examples=200, deadline=None)
@given(logits=LOGITS, top_p=st.floats(0.01, 0.99))
def test_top_p_keeps_the_smallest_set_reaching_p(logits, top_p):
    probs = torch.softmax(logits.double(), -1)
    kept = filter_probs(probs, 0, top_p, 0.0)
    mass = kept.sum()
    assert mass >= top_p - 1e-9
    smallest_kept = kept[kept > 0].min()
    assert mass - smallest_kept < top_p + 1e-9  # dropping any kept token falls short


def test_min_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert ((filter_probs(probs, 0, 1.0, 0.2) > 0) == torch.tensor([True, True, True, False])).all()


def test_banned_tokens_never_appear():
    logits = torch.tensor([10.0, 9.0, 0.0, -1.0])
    params = SamplingParams(temperature=1.0, banned_tokens=(0, 1))
    g = torch.Generator().manual_seed(0)
    draws = [int(sample(ban_tokens(logits, params.banned_tokens), params, g)) for _ in range(500)]
    assert set(draws) <= {2, 3} and set(draws) == {2, 3}
    assert int(sample(ban_tokens(logits, (0,)), SamplingParams(temperature=0))) == 1


def test_same_seed_same_draws_and_batches():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, top_p=0.9)
    a = [sample(logits, p, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert all(torch.equal(a[0], x) for x in a) and a[0].shape == (4,)
    b = sample(logits, p, torch.Generator().manual_seed(8))
    c = sample(logits, p, torch.Generator().manual_seed(9))
    assert not (torch.equal(a[0], b) and torch.equal(a[0], c))


def test_penalties_as_in_chatrwkv():
    pen = Penalties.empty(5)
    pen.add(1, decay=0.5)
    pen.add(1, decay=0.5)
    pen.add(3, decay=0.5)
    # counts: token 1 -> (1 * 0.5 + 1) * 0.5 = 0.75, token 3 -> 1
    out = apply_penalties(torch.zeros(5), pen, presence=0.2, frequency=0.1)
    assert torch.allclose(out, torch.tensor([0.0, -(0.2 + 0.075), 0.0, -(0.2 + 0.1), 0.0]))


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2},
                                 {"min_p": 1.0}, {"penalty_decay": 0}, {"stop_strings": ("",)}])
def test_bad_params_are_named(bad):
    with pytest.raises(RwkvpyError, match=next(iter(bad))):
        SamplingParams(**bad)
