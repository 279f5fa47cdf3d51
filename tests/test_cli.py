"""`sagfast demo`'s options, as a user runs them: the command in a subprocess. A value the demo cannot
use is refused while the options are parsed (exit 2, argparse's one error line naming the option), not
by a traceback once the demo has started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import sagfast
from sagfast import demo
from sagfast.cli import OWN_FLAGS, main, parser
from sagfast.config import CFG_RULES, FIELDS, PER_IMAGE
from sagfast.demo import SCHEDULERS, demo_scheduler_classes, digit_demo_size
from sagfast.digits import load_pipeline

ROOT = Path(__file__).resolve().parent.parent

REFUSED = [
    (["--scheduler", "FlowMatchEulerDiscreteScheduler"], "argument --scheduler: 'FlowMatchEulerDiscreteScheduler' is not one of"),
    (["--scheduler", "CMStochasticIterativeScheduler"], "argument --scheduler: 'CMStochasticIterativeScheduler' is not one of"),
    (["--seed", str(2**70)], f"argument --seed: an integer 0 <= seed < 2**63 expected, got {2**70}"),
    (["--seed", str(2**63)], f"argument --seed: an integer 0 <= seed < 2**63 expected, got {2**63}"),
    (["--seed", "-1"], "argument --seed: an integer 0 <= seed < 2**63 expected, got -1"),
    # the registry's flags: each value checked by its setting's own check (SAGConfig's)
    (["--pag-scale", "-1"], "argument --pag-scale: pag_scale must be >= 0, got -1.0"),
    (["--seg-scale", "nan"], "argument --seg-scale: seg_scale must be finite, got nan"),
    (["--stg-scale", "x"], "argument --stg-scale: a number expected, got 'x'"),
    (["--cfg-rule", "bogus"], "argument --cfg-rule: invalid choice: 'bogus'"),
]


def refused(options: list[str], tmp_path) -> str:
    """`sagfast demo --steps 1 OPTIONS` in a subprocess: refused (exit 2) with one error line, before any
    image is written; returns the line."""
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
    assert errors == [errors[0]] and errors[0].startswith("sagfast demo: error: "), done.stderr
    assert not out.exists()  # refused before any work
    return errors[0]


@pytest.mark.parametrize("options, message", REFUSED, ids=[" ".join(o)[:40] for o, _ in REFUSED])
def test_the_demo_refuses_a_value_it_cannot_use_with_one_error_line(options, message, tmp_path):
    assert message in refused(options, tmp_path)


def test_a_term_the_digit_models_cannot_run_is_refused_with_one_line_naming_it(tmp_path):
    # STG skips transformer blocks: the engine refuses it on the digit UNet when the pipeline is
    # enabled, which the demo does for every model before any image is made.
    error = refused(["--stg-scale", "1"], tmp_path)
    assert "unet digit model cannot run these settings" in error and "stg" in error.lower()


def flag(name: str) -> str:
    """The demo's flag of a per-image setting: its public name, but the two the demo has its own flags for."""
    public = FIELDS[name].public
    return OWN_FLAGS.get(public, "--" + public.replace("_", "-"))


def test_the_demo_has_a_flag_for_every_per_image_setting_and_every_cfg_rule(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["demo", "--help"])
    assert exit.value.code == 0
    shown = capsys.readouterr().out
    expected = {flag(name) for name in PER_IMAGE}
    assert {"--pag-scale", "--seg-scale", "--stg-scale", "--sag-scale", "--guidance"} <= expected
    for option in (*expected, "--cfg-rule"):
        assert f"  {option} " in shown or f", {option} " in shown, option
    assert set(CFG_RULES) >= {"cfg", "apg", "cfg_zero_star"}
    assert "--cfg-rule {" + ",".join(CFG_RULES) + "}" in shown
    # and each one parses: a per-image setting's flag sets its SAGConfig field (but the CFG scale, the
    # pipeline's guidance_scale as --guidance, and SAG's, --sag-scale), --cfg-rule takes every rule
    for name in PER_IMAGE:
        args = parser().parse_args(["demo", flag(name), "0.5"])
        if name in args.config_fields:
            assert getattr(args, name) == 0.5
        else:
            assert (args.guidance if flag(name) == "--guidance" else args.sag_scale) == 0.5
    assert {"pag_scale", "seg_scale", "stg_scale", "cfg_rule"} <= set(parser().parse_args(["demo"]).config_fields)
    for rule in CFG_RULES:
        assert parser().parse_args(["demo", "--cfg-rule", rule]).cfg_rule == rule


def test_the_demo_with_pag_writes_a_png_with_pag_in_the_guided_columns(tmp_path, monkeypatch):
    panel, columns = demo._digit_panel, {}

    def recording(model, pipe, spec, *args):
        columns[model] = spec
        return panel(model, pipe, spec, *args)

    monkeypatch.setattr(demo, "_digit_panel", recording)
    out = tmp_path / "pag.png"
    assert main(["demo", "--out", str(out), "--pag-scale", "1.0", "--steps", "2"]) == 0
    img = Image.open(out)
    img.verify()
    assert Image.open(out).size == digit_demo_size()
    assert set(columns) == {"unet", "dit"}
    for spec in columns.values():
        configs = [config for _, _, config in spec]
        assert configs[:2] == [None, None]  # no guidance, CFG
        assert [(c.pag_scale, c.scale, c.mode) for c in configs[2:]] == [(1.0, 0.75, "exact"), (1.0, 0.75, "batched")]
    # PAG's default layer ("mid") is no layer of the DiT: its panel perturbs the layer SAG reads
    assert columns["dit"][2][2].pag_layers == ("transformer_blocks.2.attn1",)


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
