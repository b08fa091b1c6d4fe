"""Ops with written-out backwards (relu^2, time mixing, the channels-first projection) equal
autograd's."""

import pytest
import torch

from rwkvpy.ops import squared_relu, time_mix
from rwkvpy.ops.linear import project_channels_first


def test_squared_relu_equals_autograd_including_zero():
    x = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = torch.cat([x, torch.zeros(3, dtype=torch.float64)])
    g = torch.randn_like(x)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    (squared_relu(a) * g).sum().backward()
    (torch.square(torch.relu(b)) * g).sum().backward()
    assert torch.equal(squared_relu(a).detach(), torch.square(torch.relu(x)))
    assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-15)
    with torch.no_grad():
        assert torch.equal(squared_relu(x), torch.square(torch.relu(x)))


def test_squared_relu_gradcheck():
    x = torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x.masked_fill(x.abs() < 1e-3, 0.5).requires_grad_()  # away from the kink at 0
    assert torch.autograd.gradcheck(squared_relu, (x,))


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
