"""Ops with written-out backwards (the channel mix, time mixing, the channels-first projection)
equal autograd's."""

import pytest
import torch

from rwkvpy.ops import squared_relu, time_mix
from rwkvpy.ops.activation import channel_mix_products
from rwkvpy.ops.linear import project_channels_first


def channel_mix_by_autograd(xk, xr, w_k, w_r, w_v):
    F = torch.nn.functional
    return torch.sigmoid(F.linear(xr, w_r)) * F.linear(squared_relu(F.linear(xk, w_k)), w_v)


def channel_mix_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    xk, xr = (torch.randn(2, 5, 4, dtype=torch.float64, generator=gen) for _ in range(2))
    w_k = torch.randn(7, 4, dtype=torch.float64, generator=gen)
    w_k[0] = 0  # a hidden unit exactly at relu's kink
    w_r = torch.randn(4, 4, dtype=torch.float64, generator=gen)
    w_v = torch.randn(4, 7, dtype=torch.float64, generator=gen)
    return xk, xr, w_k, w_r, w_v


def test_channel_mix_products_equal_autograd_including_the_kink():
    """The fused node's values and every gradient equal autograd through the separate ops."""
    inputs = channel_mix_inputs()
    g = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = [x.clone().requires_grad_() for x in inputs]
    b = [x.clone().requires_grad_() for x in inputs]
    out = channel_mix_products(*a)
    (out * g).sum().backward()
    (channel_mix_by_autograd(*b) * g).sum().backward()
    assert torch.allclose(out, channel_mix_by_autograd(*inputs), rtol=0, atol=1e-12)
    for x, y in zip(a, b):
        assert torch.allclose(x.grad, y.grad, rtol=0, atol=1e-12)
    with torch.no_grad():
        assert torch.equal(squared_relu(inputs[0]), torch.square(torch.relu(inputs[0])))


def test_channel_mix_products_gradcheck():
    xk, xr, w_k, w_r, w_v = channel_mix_inputs(seed=2)
    w_k[0] = 0.5  # away from the kink for finite differences
    inputs = [x.requires_grad_() for x in (xk, xr, w_k, w_r, w_v)]
    assert torch.autograd.gradcheck(channel_mix_products, inputs)


def test_the_model_trains_through_the_fused_channel_mix_only_where_it_may(monkeypatch):
    """A gradient wanted with plain weights: the fused node; under autocast, without grad, or
    with no parameter requiring grad (a loaded model outside no_grad): the separate ops."""
    import rwkvpy.models.rwkv4 as rwkv4
    from conftest import SHAPE_ATT, make_model

    calls = []
    fused = rwkv4.channel_mix_products
    monkeypatch.setattr(rwkv4, "channel_mix_products", lambda *a: calls.append(1) or fused(*a))
    model = make_model(SHAPE_ATT).requires_grad_(True)
    tokens = torch.randint(0, SHAPE_ATT.vocab_size, (2, 5))

    def fused_calls():
        calls.clear()
        model(tokens)
        return len(calls)

    assert fused_calls() == SHAPE_ATT.n_layer
    with torch.no_grad():
        assert fused_calls() == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_calls() == 0
    model.requires_grad_(False)
    assert fused_calls() == 0
@pytest.mark.parametrize("n_mixes", [1, 2, 3])
def test_time_mix_backward_equals_autograd(n_mixes):
    """time_mix's written-out backward equals autograd through shift + interpolation."""
    g = torch.Generator().manual_seed(n_mixes)
    x, last = torch.randn(3, 9, 5, dtype=torch.float64, generator=g), torch.randn(3, 5, dtype=torch.float64, generator=g)
    mixes = [torch.rand(1, 1, 5, dtype=torch.float64, generator=g) for _ in range(n_mixes)]
    gs = [torch.randn(3, 9, 5, dtype=torch.float64, generator=g) for _ in range(n_mixes)]

    def grads(f):
        leaves = [t.clone().requires_grad_() for t in (x, last, *mixes)]
        outs = f(*leaves)
        torch.autograd.backward(outs, gs)
        return outs, [t.grad for t in leaves]

    def plain(x, last, *mixes):
        shifted = torch.cat([last[:, None], x[:, :-1]], 1)
        return [shifted + m.view(-1) * (x - shifted) for m in mixes]

    outs, got = grads(time_mix)
    ref_outs, expected = grads(plain)
    for a, b in zip([*outs, *got], [*ref_outs, *expected]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: time_mix(*t), [t.clone().requires_grad_() for t in (x, last, *mixes)])


def test_time_mix_of_one_token_interpolates_with_last():
    x, last, mix = torch.randn(2, 4), torch.randn(2, 4), torch.rand(4)
    (out,) = time_mix(x, last, mix)
    assert torch.allclose(out, mix * x + (1 - mix) * last, atol=1e-6)


def test_channels_first_projection_is_linear_with_its_gradients():
    """Values, layout ((out, B, T) memory) and gradients of x and W as F.linear's; x's gradient
    comes back in x's own layout."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, dtype=torch.float64, generator=gen)
    weight = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    g = torch.randn(3, 5, 6, dtype=torch.float64, generator=gen)
    a, wa = x.clone().requires_grad_(), weight.clone().requires_grad_()
    b, wb = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y = project_channels_first(a, wa)
    assert y.permute(2, 0, 1).is_contiguous()
    (y * g).sum().backward()
    (torch.nn.functional.linear(b, wb) * g).sum().backward()
    assert torch.allclose(y, torch.nn.functional.linear(x, weight), rtol=0, atol=1e-12)
    assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-12) and a.grad.is_contiguous()
    assert torch.allclose(wa.grad, wb.grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(project_channels_first, (x.requires_grad_(), weight.requires_grad_()))
