"""`sagfast demo`'s options, as a user runs them: the command in a subprocess. A value the demo cannot
use is refused while the options are parsed (exit 2, argparse's one error line naming the option), not
by a traceback once the demo has started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sagfast
from sagfast.cli import SCHEDULERS, demo_scheduler_classes, parser
from sagfast.digits import load_pipeline

ROOT = Path(__file__).resolve().parent.parent

REFUSED = [
    (["--scheduler", "FlowMatchEulerDiscreteScheduler"], "argument --scheduler: 'FlowMatchEulerDiscreteScheduler' is not one of"),
    (["--scheduler", "CMStochasticIterativeScheduler"], "argument --scheduler: 'CMStochasticIterativeScheduler' is not one of"),
    (["--seed", str(2**70)], f"argument --seed: an integer 0 <= seed < 2**63 expected, got {2**70}"),
    (["--seed", str(2**63)], f"argument --seed: an integer 0 <= seed < 2**63 expected, got {2**63}"),
    (["--seed", "-1"], "argument --seed: an integer 0 <= seed < 2**63 expected, got -1"),
]


@pytest.mark.parametrize("options, message", REFUSED, ids=[" ".join(o)[:40] for o, _ in REFUSED])
def test_the_demo_refuses_a_value_it_cannot_use_with_one_error_line(options, message, tmp_path):
    out = tmp_path / "demo.png"
    done = subprocess.run(
        [sys.executable, "-m", "sagfast.cli", "demo", "--out", str(out), "--steps", "1", *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[0]] and errors[0].startswith("sagfast demo: error: ") and message in errors[0], done.stderr
    assert not out.exists()  # refused before any work


def test_the_accepted_schedulers_list_the_refused_ones_out_and_the_aliases_in():
    accepted = demo_scheduler_classes()
    for name in ("FlowMatchEulerDiscreteScheduler", "CMStochasticIterativeScheduler", "EDMEulerScheduler"):
        assert name not in accepted
    import diffusers

    assert {getattr(diffusers, name).__name__ for name in SCHEDULERS.values()} <= set(accepted)


@pytest.mark.parametrize("name", demo_scheduler_classes())
def test_every_accepted_scheduler_runs_the_digit_unet_with_sag(name):
    # What the demo does with --scheduler NAME: the digit UNet built with it, guided by CFG and SAG.
    args = parser().parse_args(["demo", "--scheduler", name])
    import diffusers

    pipe = load_pipeline(scheduler=getattr(diffusers, args.scheduler), progress=False)
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = pipe([3, 8], num_inference_steps=4, guidance_scale=3.0, latents=noise.clone(), output_type="pt").images
    sagfast.enable(pipe, scale=0.75)
    guided = pipe([3, 8], num_inference_steps=4, guidance_scale=3.0, latents=noise.clone(), output_type="pt").images
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3


def test_the_largest_seed_is_one_torch_takes():
    seed = parser().parse_args(["demo", "--seed", str(2**63 - 1)]).seed
    assert seed == 2**63 - 1
    torch.randn(1, generator=torch.Generator().manual_seed(seed + 1000))  # the SD demo's seed + row
