"""pytest-benchmark: one denoising pipeline call per mode on the tiny UNet (CPU or CUDA).

    pytest bench/ --benchmark-only                       # all suites
    pytest bench/test_bench_step.py --benchmark-only --benchmark-save=step   # keep for --benchmark-compare

pytest-benchmark times one test after the other, not interleaved: these suites are for tracking
regressions between commits on one machine. The figures in docs/performance.md come from the interleaved CLI
(`python -m bench step`), where ratios are paired round by round.
"""

from __future__ import annotations

import pytest
import torch

from bench import common, models, step

DEVICE = common.pick_device("auto")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
STEPS = 3
SIZE = 128  # latent 16x16


@pytest.fixture(scope="module")
def runners():
    built, skipped, _ = step.build_variants(models.TINY, SIZE, STEPS, DEVICE, DTYPE, None, lambda msg: None)
    return built, skipped


@pytest.mark.parametrize("variant", list(step.LABELS))
def test_step_tiny(benchmark, runners, variant):
    built, skipped = runners
    if variant in skipped:
        pytest.skip(skipped[variant])
    if variant not in built:
        pytest.skip(f"{variant} not built")
    runner = built[variant]
    benchmark.group = f"step tiny {SIZE}x{SIZE}, {STEPS} steps, {DEVICE.type}"
    benchmark.extra_info.update(variant=step.LABELS[variant], steps=STEPS, device=str(DEVICE), dtype=str(DTYPE))
    benchmark.pedantic(runner, rounds=5, warmup_rounds=1, iterations=1)
    # the runner marks every step and raises if a call did not run all of them
    assert runner.first_steps and all(t > 0 for t in runner.first_steps)
