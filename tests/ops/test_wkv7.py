"""The RWKV-7 WKV forms compute one function: outputs, final states and gradients agree."""

import math

import pytest
import torch

from conftest import rel_err
from rwkvpy.ops.wkv7 import wkv7_chunked, wkv7_recurrent, wkv7_step

MAX_LOG_DECAY = math.exp(-0.5)  # log w lies in (-e^-0.5, 0)


def make_inputs(B, T, H, N, seed=0, dtype=torch.float64, a=None, decay=None):
    """Random inputs as the model makes them: kk unit per head, a in (0, 1), log w in its range.
    ``a`` fixes the in-context rate; ``decay`` "none" / "fastest" puts w at its bounds."""
    g = torch.Generator().manual_seed(seed)

    def randn():
        return torch.randn(B, T, H, N, generator=g, dtype=dtype)

    r, k, v = randn(), randn(), randn()
    logits = randn() * 3
    if decay == "none":
        logits = -logits.abs() - 30  # sigmoid ~ 1e-13: w = 1 to fp64 precision
    elif decay == "fastest":
        logits = logits.abs() + 30  # w = e^-0.6065
    log_w = -MAX_LOG_DECAY * torch.sigmoid(logits)
    kk = torch.nn.functional.normalize(randn(), dim=-1)
    rate = torch.sigmoid(randn()) if a is None else torch.full((B, T, H, N), float(a), dtype=dtype)
    S = torch.randn(B, H, N, N, generator=g, dtype=dtype)
    return r, log_w, k, v, -kk, kk * rate, S


def assert_same(a, b, tol):
    assert rel_err(a[0], b[0]) <= tol
    assert rel_err(a[1], b[1]) <= tol


@pytest.mark.parametrize("T,L", [(1, 16), (16, 16), (64, 16), (37, 8), (50, 64), (33, 5), (20, 1)])
def test_chunked_equals_recurrent_float64(T, L):
    x = make_inputs(2, T, 3, 8, seed=T * 100 + L)
    assert_same(wkv7_chunked(*x, chunk_len=L), wkv7_recurrent(*x), 1e-10)


@pytest.mark.parametrize("a", [0.0, 1.0])
@pytest.mark.parametrize("decay", [None, "none", "fastest"])
def test_extremes_float64(a, decay):
    x = make_inputs(1, 45, 2, 16, seed=7, a=a, decay=decay)
    assert_same(wkv7_chunked(*x, chunk_len=16), wkv7_recurrent(*x), 1e-10)


def test_step_is_one_token_of_the_recurrence():
    x = make_inputs(3, 1, 2, 8, seed=3)
    y, S = wkv7_step(*(t[:, 0] for t in x[:-1]), x[-1])
    y_ref, S_ref = wkv7_recurrent(*x)
    assert torch.equal(y, y_ref[:, 0]) and torch.equal(S, S_ref)
    # and by hand: S' = S diag(w) + (S alpha) beta^T + v k^T, y = S' r
    r, log_w, k, v, alpha, beta = (t[0, 0, 0] for t in x[:-1])
    S0 = x[-1][0, 0]
    S1 = S0 @ torch.diag(torch.exp(log_w)) + torch.outer(S0 @ alpha, beta) + torch.outer(v, k)
    assert rel_err(S[0, 0], S1) < 1e-14 and rel_err(y[0, 0], S1 @ r) < 1e-14


@pytest.mark.parametrize("split", [1, 15, 16, 17, 40])
def test_chunked_continues_from_its_own_state(split):
    x = make_inputs(2, 57, 2, 8, seed=split)
    whole = wkv7_chunked(*x, chunk_len=16)
    first = wkv7_chunked(*(t[:, :split] for t in x[:-1]), x[-1], chunk_len=16)
    second = wkv7_chunked(*(t[:, split:] for t in x[:-1]), first[1], chunk_len=16)
    assert_same((torch.cat([first[0], second[0]], 1), second[1]), whole, 1e-12)


def test_gradients_chunked_equal_recurrent_float64():
    x = [t.requires_grad_() for t in make_inputs(2, 29, 2, 8, seed=11)]
    g = torch.Generator().manual_seed(1)
    y_ref, S_ref = wkv7_recurrent(*x)
    gy, gS = torch.randn(y_ref.shape, generator=g, dtype=y_ref.dtype), torch.randn(S_ref.shape, generator=g,
                                                                                    dtype=S_ref.dtype)
    ref = torch.autograd.grad((y_ref * gy).sum() + (S_ref * gS).sum(), x)
    y, S = wkv7_chunked(*x, chunk_len=8)
    got = torch.autograd.grad((y * gy).sum() + (S * gS).sum(), x)
    names = ["r", "log_w", "k", "v", "alpha", "beta", "S"]
    for name, a, b in zip(names, got, ref):
        assert rel_err(a, b) < 1e-9, name


@pytest.mark.parametrize("L", [16, 32, 64])
def test_chunked_float32_close_to_float64(L):
    x = make_inputs(1, 200, 2, 64, seed=L)
    ref = wkv7_recurrent(*x)
    got = wkv7_chunked(*(t.float() for t in x), chunk_len=L)
    assert rel_err(got[0].double(), ref[0]) < 1e-5
    assert rel_err(got[1].double(), ref[1]) < 1e-5


@pytest.mark.parametrize("T,L", [(29, 8), (16, 16), (7, 32)])
def test_zero_state_and_unused_state_out_take_shortcuts_with_the_same_gradients(T, L):
    """``S=None`` (a zero state, skipping its products) and a state out that nothing uses (its
    backward skipped) give what zeros and a zero state gradient give, in fp64."""
    x = [t.requires_grad_() for t in make_inputs(2, T, 2, 8, seed=T)[:-1]]
    zeros = torch.zeros(2, 2, 8, 8, dtype=torch.float64)
    gy = torch.randn(2, T, 2, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y_ref, S_ref = wkv7_recurrent(*x, zeros)
    ref = torch.autograd.grad((y_ref * gy).sum(), x)
    y, S = wkv7_chunked(*x, None, chunk_len=L)
    assert rel_err(y, y_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10
    one = wkv7_step(*(t[:, 0] for t in x), None)
    assert all(torch.equal(a, b) for a, b in zip(one, wkv7_step(*(t[:, 0] for t in x), zeros)))
    got = torch.autograd.grad((y * gy).sum(), x)  # S unused: its gradient comes as None
    for name, a, b in zip(["r", "log_w", "k", "v", "alpha", "beta"], got, ref):
        assert rel_err(a, b) < 1e-9, name
    gS = torch.randn(S.shape, generator=torch.Generator().manual_seed(6), dtype=S.dtype)
    y_ref, S_ref = wkv7_recurrent(*x, zeros)
    ref = torch.autograd.grad((y_ref * gy).sum() + (S_ref * gS).sum(), x)
    y, S = wkv7_chunked(*x, None, chunk_len=L)
    got = torch.autograd.grad((y * gy).sum() + (S * gS).sum(), x)
    for name, a, b in zip(["r", "log_w", "k", "v", "alpha", "beta"], got, ref):
        assert rel_err(a, b) < 1e-9, name


def test_half_precision_inputs_are_widened():
    """Under bf16 autocast the projections hand the WKV bf16 tensors: it computes in fp32."""
    x = make_inputs(1, 40, 2, 16, seed=9, dtype=torch.float32)
    ref = wkv7_chunked(*(t.bfloat16().float() for t in x[:-1]), x[-1], chunk_len=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, S = wkv7_chunked(*(t.bfloat16() for t in x[:-1]), x[-1], chunk_len=16)
    assert y.dtype == S.dtype == torch.float32
    assert rel_err(y, ref[0]) < 1e-6 and rel_err(S, ref[1]) < 1e-6


@pytest.mark.parametrize("zero_in", [False, True])
def test_chunked_form_traces_whole_under_torch_compile(zero_in):
    """torch.compile sees the chunked form, its backward included, as one graph (a graph break
    there, from ``out=`` into a slice, made compiled RWKV-7 training fail in torch's replay of
    aliased outputs), and the traced graph (the copies that replace ``out=`` there) computes
    what eager does: outputs and gradients in fp64, three chunks, the last one padded."""
    torch._dynamo.reset()
    *x, S = make_inputs(2, 20, 2, 8, seed=11)
    S = None if zero_in else S.requires_grad_()
    x = [t.requires_grad_() for t in x]

    def loss(*x):
        y, S_out = wkv7_chunked(*x, chunk_len=8)
        return (y * y).sum() + S_out.sum()

    assert torch._dynamo.explain(loss)(*x, S).graph_break_count == 0
    inputs = [t for t in (*x, S) if t is not None]
    eager, traced = loss(*x, S), torch.compile(loss, backend="aot_eager")(*x, S)
    assert rel_err(traced, eager) < 1e-12
    for a, b in zip(torch.autograd.grad(traced, inputs), torch.autograd.grad(eager, inputs)):
        assert rel_err(a, b) < 1e-12
