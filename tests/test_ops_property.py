"""Property tests (hypothesis) of each op on random shapes and values, large magnitudes included:
every backend here agrees with the reference, and outputs are finite where the inputs are.

Few examples and small shapes: the Triton backend runs under the interpreter on a CPU machine.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ops_backends import DEVICE, TOL, WHY_NOT

from sagfast import ops

HERE = [name for name, why in WHY_NOT.items() if not why]
pytestmark = [pytest.mark.skipif(not HERE, reason="no backend besides the reference runs here")]
if DEVICE.type == "cuda":
    pytestmark.append(pytest.mark.gpu)  # on CUDA tensors: part of the GPU checks (pytest -m gpu)
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
DTYPES = st.sampled_from([torch.float32, torch.float16])


def randn(shape, magnitude, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * magnitude).to(device=DEVICE, dtype=dtype)


@SETTINGS
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 3),
    n=st.integers(1, 70),
    d=st.sampled_from([8, 40, 64, 80, 160]),
    magnitude=st.sampled_from([1e-3, 1.0, 4.0, 30.0]),
    dtype=DTYPES,
    seed=st.integers(0, 2**16),
)
def test_attention_mass_property(b, h, n, d, magnitude, dtype, seed):
    q = randn((b, h, n, d), magnitude, seed, dtype)
    k = randn((b, h, n, d), magnitude, seed + 1, dtype)
    scale = d**-0.5
    scores = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1).float()
    ref = ops.attention_mass_ref(q, k, lse, scale)
    # exp(s - lse) inherits the fp32 rounding of the score s, ~|s| * 2^-24 per product summed over d:
    # the bound grows with the largest score (magnitude 30 gives scores in the thousands: one-hot rows).
    tol = 2e-5 + 1e-6 * scores.abs().max().item()
    for backend in HERE:
        mass, mask = ops.attention_mass(q, k, lse, scale, backend=backend, threshold=1.0)
        assert torch.isfinite(mass).all(), backend
        assert (mass >= 0).all()
        assert (mass - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item()), backend
        assert abs(mass.mean().item() - 1.0) <= 1e-3 + tol
        assert torch.equal(mask, mass > 1.0)


@SETTINGS
@given(
    b=st.integers(1, 3),
    c=st.integers(1, 4),
    hgt=st.integers(5, 24),
    wid=st.integers(5, 24),
    frac=st.tuples(st.floats(0.05, 1.0), st.floats(0.05, 1.0)),
    ksize=st.sampled_from([1, 3, 5, 9]),
    sigma=st.floats(0.3, 4.0),
    exponent=st.integers(-3, 30),
    dtype=DTYPES,
    seed=st.integers(0, 2**16),
)
def test_degrade_property(b, c, hgt, wid, frac, ksize, sigma, exponent, dtype, seed):
    h, w = max(1, int(hgt * frac[0])), max(1, int(wid * frac[1]))
    # fp16 tops out at 65504: keep sqrt(a) * x + sqrt(1 - a) * eps (<= 1.42 * max) representable.
    magnitude = min(10.0**exponent, 3e4) if dtype == torch.float16 else 10.0**exponent
    x0 = randn((b, c, hgt, wid), magnitude, seed, dtype).clamp(-2 * magnitude, 2 * magnitude)
    eps = randn((b, c, hgt, wid), magnitude, seed + 1, dtype).clamp(-2 * magnitude, 2 * magnitude)
    if dtype == torch.float16:
        x0, eps = x0.clamp(-3e4, 3e4), eps.clamp(-3e4, 3e4)
    g = torch.Generator().manual_seed(seed + 2)
    mask = (torch.rand(b, h, w, generator=g) > 0.5).to(DEVICE)
    abar = torch.rand(b, generator=g).to(DEVICE)
    ref = ops.degrade_ref(x0, mask, eps, abar, ksize, sigma)
    assert torch.isfinite(ref).all()
    atol, rtol = TOL[dtype]
    scale = max(x0.abs().max().item(), eps.abs().max().item(), 1e-30)
    for backend in HERE:
        out = ops.degrade(x0, mask, eps, abar, ksize, sigma, backend=backend)
        assert torch.isfinite(out).all(), backend
        # Relative to the inputs' magnitude: the blur sums values of either sign.
        assert (out.float() - ref.float()).abs().max().item() <= (atol + rtol) * scale, backend


@SETTINGS
@given(
    chunks=st.integers(1, 3),
    b=st.integers(1, 3),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    exponent=st.integers(-3, 30),
    scale=st.floats(-10.0, 10.0),
    dtype=DTYPES,
    seed=st.integers(0, 2**16),
)
def test_combine_property(chunks, b, shape, exponent, scale, dtype, seed):
    magnitude = min(10.0**exponent, 1e4) if dtype == torch.float16 else 10.0**exponent
    if dtype == torch.float16:
        scale = max(-1.0, min(1.0, scale))  # |o| + |s| * 2 * max stays under 65504
    o = randn((chunks * b, *shape), magnitude, seed, dtype).clamp(-2 * magnitude, 2 * magnitude)
    guide = randn((b, *shape), magnitude, seed + 1, dtype).clamp(-2 * magnitude, 2 * magnitude)
    deg = randn((b, *shape), magnitude, seed + 2, dtype).clamp(-2 * magnitude, 2 * magnitude)
    ref = ops.combine_ref(o, guide, deg, scale)
    assert torch.isfinite(ref).all()
    atol, rtol = TOL[dtype]
    bound = (atol + rtol) * max(o.abs().max().item(), abs(scale) * (guide - deg).abs().max().item(), 1e-30)
    for backend in HERE:
        out = ops.combine(o, guide, deg, scale, backend=backend)
        assert torch.isfinite(out).all(), backend
        assert (out.float() - ref.float()).abs().max().item() <= bound, backend
