"""The projection kernels (every storage, every rows class) against plain products, and the
int8 quantizer."""

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from rwkvpy.ops import plan
from rwkvpy.ops.quant import quantize_int8

ROWS = [1, 2, 3, 16, 17, 64, 65]  # both sides of every rows class
OUTS = [1, 7, 64]


def within_rounding(y, x, w, unit):
    """|y - x w^T| <= unit * |x| |w|^T elementwise: rounding x and y to a format with relative
    precision unit/2 moves each term by at most that (a bound that survives cancellation)."""
    return bool(((y - F.linear(x, w)).abs() <= unit * F.linear(x.abs(), w.abs()) + 1e-7).all())


def weights(out, n_in, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n_in, generator=g) / n_in**0.5


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("out", OUTS)
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_fp32_kernels_equal_f_linear(rows, out, layout):
    n_in = 2048
    w = weights(out * 32, n_in)
    x = torch.randn(rows, n_in)
    for w in (w, w[:-1]):  # an odd number of rows: the split product computes the last apart
        stored = plan.store(w, "float32", layout)
        names = ["linear", "split"] if layout == "out_in" else ["linear"]
        with torch.no_grad():
            for name in names:
                # fp32 sums of 2048 terms in another order: ~sqrt(2048) * 2^-24 relative
                assert rel_err(plan.KERNELS[name](x, stored), F.linear(x, w)) < 1e-5, name
                assert plan.KERNELS[name](x.view(1, rows, n_in), stored).shape == (1, rows, w.shape[0])


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", ["linear", "upcast", "split"])
def test_half_weight_products_are_fp32_products_of_the_rounded_weights(rows, dtype, kernel):
    w = weights(64, 48)
    wh = w.to(dtype)
    x = torch.randn(rows, 48)
    with torch.no_grad():
        y = plan.KERNELS[kernel](x, wh)
    assert y.dtype == torch.float32
    # A half-precision product rounds x and y to the weight's dtype too (8 or 11 mantissa bits).
    assert within_rounding(y, x, wh.float(), 2**-8 if dtype == torch.bfloat16 else 2**-10)


@pytest.mark.parametrize("kernel", ["linear", "split"])
def test_fp16_products_scale_unbounded_inputs(kernel):
    """relu(k)^2 reaches past fp16's 65504: a projection marked unbounded scales it first."""
    w = weights(64, 48).to(torch.float16)
    x = torch.randn(3, 48) * 1000
    x[0, 0] = 3e5
    with torch.no_grad():
        y = plan.KERNELS[kernel](x, w, None, True)
        assert not torch.isfinite(plan.KERNELS[kernel](x, w, None, False)).all()  # what it guards against
    assert within_rounding(y, x, w.float(), 2**-10)


def test_quantize_int8_error_is_at_most_half_a_step():
    w = weights(64, 48)
    w[3] = 0  # a zero row (zero-initialised projections exist) must not produce NaN
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (64,)
    assert (q[3] == 0).all() and torch.isfinite(scale).all()
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert (q.abs().amax(1)[scale > 1e-9] == 127).all()  # every nonzero row uses the full range


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("out", OUTS)
@pytest.mark.parametrize("n_in", [48, 37])
def test_int8_dequantized_product(rows, out, n_in):
    w = weights(out, n_in)
    q, scale = quantize_int8(w)
    x = torch.randn(rows, n_in)
    with torch.no_grad():
        y = plan.int8_dequantized(x, q, scale)
    assert within_rounding(y, x, q.float() * scale[:, None], 2**-20)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("out", OUTS)
@pytest.mark.parametrize("n_in", [48, 37])
def test_int8_bf16_product(rows, out, n_in):
    """int8 weights widened to bf16 (exact), x rounded to bf16, fp32 sums, per-row scales: within
    three bf16 roundings of the product with the dequantized weights; relu(k)^2-sized inputs too."""
    w = weights(out, n_in)
    q, scale = quantize_int8(w)
    assert torch.equal(q.to(torch.bfloat16).to(torch.int8), q)
    for x in (torch.randn(rows, n_in), torch.relu(torch.randn(rows, n_in) * 100).square()):
        with torch.no_grad():
            y = plan.int8_bf16(x, q, scale)
        assert y.dtype == torch.float32
        assert within_rounding(y, x, q.float() * scale[:, None], 3 * 2**-9)


def test_torch_int8_kernel_where_the_probe_passed_it():
    """torch's int8 kernel runs in this process only for shapes a subprocess probe found right
    (on AVX-512 CPUs it crashes or returns garbage when in_features is not a multiple of 16)."""
    shapes = [(64, 48), (7, 64), (64, 168), (48, 40)]
    verdict = plan.probe_int8(shapes)
    assert set(verdict) == set(shapes)
    for (out, n_in), ok in verdict.items():
        if not ok:
            continue
        q, scale = quantize_int8(weights(out, n_in))
        for rows in ROWS:
            x = torch.randn(rows, n_in)
            with torch.no_grad():
                y = plan.int8_packed(x, q, scale.to(torch.bfloat16))
            # x and the scale in bf16, the result returned in bf16: three roundings of 2^-9 each.
            # Measured worst case: 1.37 x 2^-8 (a bound of 2^-8 flaked).
            assert within_rounding(y, x, q.float() * scale[:, None], 3 * 2**-9 + 2**-16)
