"""Retention's three forms compute one function: outputs, final states and gradients agree."""

import math

import pytest
import torch

from conftest import rel_err
from rwkvpy.ops.retention import (decays, position_scale, retention_chunkwise, retention_parallel,
                                  retention_recurrent, retention_step, rotate)


def make_inputs(B=2, T=37, H=3, dk=8, dv=16, seed=0, dtype=torch.float64, state=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, dk, generator=g, dtype=dtype)
    k = torch.randn(B, T, H, dk, generator=g, dtype=dtype) / math.sqrt(dk)
    v = torch.randn(B, T, H, dv, generator=g, dtype=dtype)
    S = torch.randn(B, H, dk, dv, generator=g, dtype=dtype) if state else torch.zeros(B, H, dk, dv, dtype=dtype)
    return q, k, v, decays(H, dtype=dtype), S


def forms(T):
    yield "parallel", retention_parallel
    for L in (1, 3, T, 10):  # 10 does not divide 37
        yield f"chunkwise {L}", lambda *a, L=L: retention_chunkwise(*a, chunk_len=L)


@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("kind", ["reference", "log"])
def test_forms_agree_float64(state, kind):
    q, k, v, _, S = make_inputs(state=state)
    lg = decays(3, kind)
    ref = retention_recurrent(q, k, v, lg, S)
    for name, form in forms(37):
        o, S_end = form(q, k, v, lg, S)
        assert rel_err(o, ref[0]) < 1e-10, name
        assert rel_err(S_end, ref[1]) < 1e-10, name


def test_zero_state_and_no_state_out_shortcuts_change_nothing():
    """``S=None`` (a zero state, as training starts) and ``state_out=False`` skip products, and
    give what the full computation gives from zeros."""
    q, k, v, lg, zeros = make_inputs(state=False)
    ref = retention_recurrent(q, k, v, lg, zeros)
    o, S = retention_parallel(q, k, v, lg, None)
    assert rel_err(o, ref[0]) < 1e-10 and rel_err(S, ref[1]) < 1e-10
    o, S = retention_parallel(q, k, v, lg, None, state_out=False)
    assert rel_err(o, ref[0]) < 1e-10 and S is None
    o, S = retention_chunkwise(q, k, v, lg, None, chunk_len=10)
    assert rel_err(o, ref[0]) < 1e-10 and rel_err(S, ref[1]) < 1e-10
    one = retention_step(q[:, 0], k[:, 0], v[:, 0], lg, None)
    assert all(torch.equal(a, b) for a, b in zip(one, retention_step(q[:, 0], k[:, 0], v[:, 0], lg, zeros)))


@pytest.mark.parametrize("split", [1, 9, 20, 36])
def test_calls_continue_each_other(split):
    q, k, v, lg, S = make_inputs(seed=split)
    whole = retention_chunkwise(q, k, v, lg, S, chunk_len=8)
    first = retention_chunkwise(q[:, :split], k[:, :split], v[:, :split], lg, S, chunk_len=8)
    second = retention_chunkwise(q[:, split:], k[:, split:], v[:, split:], lg, first[1], chunk_len=8)
    assert rel_err(torch.cat([first[0], second[0]], 1), whole[0]) < 1e-12
    assert rel_err(second[1], whole[1]) < 1e-12


def test_float32_forms_agree():
    q, k, v, lg, S = make_inputs(T=300, seed=3, dtype=torch.float32)
    ref = retention_recurrent(*(t.double() for t in (q, k, v, lg, S)))
    for name, form in forms(300):
        o, S_end = form(q, k, v, lg, S)
        assert rel_err(o.double(), ref[0]) < 1e-5, name
        assert rel_err(S_end.double(), ref[1]) < 1e-5, name


def test_gradients_of_chunkwise_equal_parallel_float64():
    x = [t.requires_grad_() for t in make_inputs(T=23, seed=5)]
    g = torch.Generator().manual_seed(2)
    o, S = retention_parallel(*x)
    go = torch.randn(o.shape, generator=g, dtype=o.dtype)
    gS = torch.randn(S.shape, generator=g, dtype=S.dtype)
    ref = torch.autograd.grad((o * go).sum() + (S * gS).sum(), [x[0], x[1], x[2], x[4]])
    for L in (1, 4, 23):
        o, S = retention_chunkwise(*x, chunk_len=L)
        got = torch.autograd.grad((o * go).sum() + (S * gS).sum(), [x[0], x[1], x[2], x[4]])
        for name, a, b in zip("qkvS", got, ref):
            assert rel_err(a, b) < 1e-10, (L, name)


def test_rotation_is_torchscales_theta_shift():
    """torchscale's RetNet: angles 1/10000^linspace(0, 1, d/2), each repeated for its pair,
    and ``theta_shift(x) = x cos + rotate_every_two(x) sin`` (written out here as it is there)."""
    d = 16
    x = torch.randn(2, 5, 3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    pos = torch.tensor([[0, 1, 2, 7, 1000], [3, 4, 5, 6, 123456]])
    angle = (1.0 / 10000 ** torch.linspace(0, 1, d // 2, dtype=torch.float64)).unsqueeze(-1).repeat(1, 2).flatten()
    sin = torch.sin(pos[..., None, None] * angle)
    cos = torch.cos(pos[..., None, None] * angle)
    every_two = torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)
    assert rel_err(rotate(x, pos), x * cos + every_two * sin) < 1e-12
    assert rel_err(rotate(x.float(), pos).double(), x * cos + every_two * sin) < 1e-6
    assert rotate(x.bfloat16(), pos).dtype == torch.bfloat16


def test_rotation_is_relative():
    """q(n) . k(m) after rotation depends only on n - m, and norms are kept."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 16, generator=g,
                                                                                   dtype=torch.float64)

    def dot(n, m):
        return (rotate(q, torch.tensor([[n]])) * rotate(k, torch.tensor([[m]]))).sum().item()

    assert dot(7, 3) == pytest.approx(dot(104, 100), rel=1e-10)
    assert dot(7, 3) != pytest.approx(dot(7, 4), rel=1e-3)
    assert rotate(q, torch.tensor([[12345]])).norm().item() == pytest.approx(q.norm().item(), rel=1e-12)


def test_position_scale_is_the_papers():
    lg = decays(2)
    pos = torch.tensor([[0, 5, 99]])
    got = position_scale(pos, lg)[0, :, :, 0]  # (T, H)
    for j, n in enumerate((0, 5, 99)):
        for h in range(2):
            gamma = math.exp(lg[h].item())
            assert got[j, h].item() == pytest.approx(1 / math.sqrt(sum(gamma ** i for i in range(n + 1))), rel=1e-12)


def test_decays():
    assert torch.allclose(torch.exp(decays(4)), torch.tensor([1 - 2 ** -5, 1 - 2 ** -6, 1 - 2 ** -7, 1 - 2 ** -8],
                                                             dtype=torch.float64))
    log = torch.exp(decays(3, "log"))
    assert log[0].item() == pytest.approx(1 - 1 / 32) and log[-1].item() == pytest.approx(1 - 1 / 512)
