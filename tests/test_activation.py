"""relu(x)^2 with its written-out backward equals autograd's relu and square."""

import torch

from rwkvpy.ops import squared_relu


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
