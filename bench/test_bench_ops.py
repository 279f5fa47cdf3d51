"""pytest-benchmark: SAG's ops per backend on the shapes of an SD 1.5 step at 512x512 (latent 64x64).

attention_mass on the mid block's map (N=64, 8 heads of 160) and on higher-resolution layers
(N=1024 heads of 80, N=4096 heads of 40); degrade and combine on the latent. A backend that is not
built here (or refuses the device) is skipped with its reason.
"""

from __future__ import annotations

import pytest
import torch

from bench import common
from sagfast import ops
from sagfast.attention.lse import sdpa_with_lse
from sagfast.ops._dispatch import BackendUnsupported

DEVICE = common.pick_device("auto")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
BACKENDS = ("torch", "cpp", "triton")
LATENT = 64


def _call(benchmark, fn, group, **info):
    try:
        probe = common.time_call(fn, DEVICE)
    except (BackendUnsupported, ValueError, NotImplementedError, RuntimeError) as exc:
        pytest.skip(f"{type(exc).__name__}: {exc}")
    benchmark.group = group
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE), **info)

    def run():
        fn()
        common.sync(DEVICE)

    benchmark.pedantic(run, rounds=5 if probe > 0.2 else 20, warmup_rounds=1, iterations=1)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, DTYPE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,heads,dim", [(64, 8, 160), (1024, 8, 80), (4096, 8, 40)])
def test_attention_mass(benchmark, backend, n, heads, dim):
    q, k = _rand(1, heads, n, dim, seed=1), _rand(1, heads, n, dim, seed=2)
    scale = dim**-0.5
    with torch.inference_mode():
        _, lse = sdpa_with_lse(q, k, k, scale)
    out = {}

    def fn():
        out["m"] = ops.attention_mass(q, k, lse, scale, backend=backend)

    _call(benchmark, fn, f"attention_mass N={n} H={heads} D={dim}", backend=backend)
    assert out["m"].shape == (1, n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_degrade(benchmark, backend):
    x0, eps = _rand(1, 4, LATENT, LATENT, seed=3), _rand(1, 4, LATENT, LATENT, seed=4)
    mask = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(5)).to(DEVICE) > 0.5
    abar = torch.full((1,), 0.5, device=DEVICE)
    out = {}

    def fn():
        out["x"] = ops.degrade(x0, mask, eps, abar, 9, 1.0, backend=backend)

    _call(benchmark, fn, f"degrade 1x4x{LATENT}x{LATENT}", backend=backend)
    assert out["x"].shape == x0.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine(benchmark, backend):
    o, deg = _rand(2, 4, LATENT, LATENT, seed=6), _rand(1, 4, LATENT, LATENT, seed=7)
    out = {}

    def fn():
        out["o"] = ops.combine(o, o[:1], deg, 0.75, backend=backend)

    _call(benchmark, fn, f"combine 2x4x{LATENT}x{LATENT}", backend=backend)
    assert out["o"].shape == o.shape
