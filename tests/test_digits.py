"""The embedded digit model: shipped weights load offline, the model is really trained, the pipeline
works with sagfast like a Stable Diffusion pipeline, the demo writes its PNG, the training script and
the quality benchmark run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sagfast
from sagfast.digits import DigitDiffusionPipeline, load_classifier, load_pipeline
from sagfast.digits.data import load_mnist
from sagfast.digits.weights import WEIGHTS_DIR

LABELS = [d for d in range(10) for _ in range(3)]  # 30 digits, 3 per class


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Nothing here may touch the network: the weights ship with the package.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIFFUSERS_OFFLINE", "1")
    monkeypatch.delenv("SAGFAST_DIGITS_WEIGHTS", raising=False)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(progress=False)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def _noise(n, seed=0):
    return torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def _accuracy(classifier, images, labels):
    with torch.no_grad():
        pred = classifier(images.float().clamp(-1, 1)).argmax(1)
    return (pred == torch.tensor(labels)).float().mean().item()


def test_shipped_weights_small_and_complete():
    files = {p.name: p.stat().st_size for p in WEIGHTS_DIR.iterdir()}
    for name in (
        "digits_unet.safetensors",
        "digits_unet.json",
        "digits_class_embedding.safetensors",
        "digits_class_embedding.json",
        "digits_scheduler.json",
        "digits_classifier.safetensors",
    ):
        assert name in files, f"{name} missing from {WEIGHTS_DIR}"
    total = sum(files.values())
    assert total < 6 * 2**20, f"shipped weights are {total / 2**20:.1f} MiB"


def test_pipeline_structure(pipe):
    assert isinstance(pipe, DigitDiffusionPipeline)
    assert set(pipe.components) == {"unet", "class_embedding", "scheduler"}
    assert pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1 is not None
    assert pipe.unet.config.sample_size == 32 and pipe.unet.config.in_channels == 1
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())


def test_real_digits_classified(classifier):
    x, y = load_mnist()
    assert x.shape == (5000, 1, 32, 32) and float(x.min()) == -1.0 and float(x.max()) == 1.0
    idx = torch.arange(0, 5000, 10)
    assert _accuracy(classifier, x[idx], y[idx].tolist()) > 0.9


def test_samples_recognised_as_requested_digit(pipe, classifier):
    """The diffusion model is really trained: chance is 10%."""
    out = pipe(LABELS, num_inference_steps=10, guidance_scale=3.0, latents=_noise(len(LABELS)), output_type="latent")
    acc = _accuracy(classifier, out.images, LABELS)
    assert acc >= 0.7, f"only {acc:.0%} of the generated digits are recognised as the requested digit"
    # without guidance too, well above chance
    out = pipe(LABELS, num_inference_steps=10, guidance_scale=1.0, latents=_noise(len(LABELS)), output_type="latent")
    assert _accuracy(classifier, out.images, LABELS) >= 0.4


def test_output_types(pipe):
    kw = dict(num_inference_steps=2, latents=_noise(2))
    pil = pipe([1, 7], **kw).images
    assert len(pil) == 2 and pil[0].size == (32, 32) and pil[0].mode == "L"
    arr = pipe([1, 7], output_type="np", **kw).images
    assert arr.shape == (2, 32, 32, 1) and arr.min() >= 0 and arr.max() <= 1
    pt = pipe([1, 7], output_type="pt", **kw).images
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), arr)
    assert np.array_equal(np.asarray(pil[1]), (arr[1, :, :, 0] * 255).round().astype(np.uint8))


def test_bad_labels(pipe):
    with pytest.raises(ValueError, match="digits 0..9"):
        pipe([3, 10], num_inference_steps=1)
    with pytest.raises(ValueError, match="shape"):
        pipe([3], num_inference_steps=1, latents=_noise(2))


def test_generator_reproducible(pipe):
    a = pipe([4, 5], num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="pt").images
    b = pipe([4, 5], num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="pt").images
    c = pipe([4, 5], num_inference_steps=3, generator=torch.Generator().manual_seed(4), output_type="pt").images
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_enable_changes_output_and_scale0_is_plain(guidance):
    pipe = load_pipeline(progress=False)
    kw = dict(num_inference_steps=4, guidance_scale=guidance, output_type="pt")
    base = pipe.unet
    plain = pipe([0, 8], latents=_noise(2), **kw).images
    sagfast.enable(pipe, scale=0.0)
    assert torch.equal(pipe([0, 8], latents=_noise(2), **kw).images, plain)
    sagfast.enable(pipe, scale=0.75)
    batches = []
    hook = base.register_forward_pre_hook(
        lambda m, args, kwargs: batches.append((args[0] if args else kwargs["sample"]).shape[0]), with_kwargs=True
    )
    try:
        guided = pipe([0, 8], latents=_noise(2), **kw).images
    finally:
        hook.remove()
    assert (guided - plain).abs().max() > 1e-3
    # exact mode: per step the main pass on the pipeline's batch, then the degraded pass on the guide branch
    main = 4 if guidance > 1 else 2
    assert batches == [main, 2] * 4
    sagfast.disable(pipe)
    assert torch.equal(pipe([0, 8], latents=_noise(2), **kw).images, plain)


def test_sag_with_euler_scheduler():
    from diffusers import EulerDiscreteScheduler

    pipe = load_pipeline(scheduler=EulerDiscreteScheduler, progress=False)
    plain = pipe([2, 6], num_inference_steps=4, latents=_noise(2), output_type="pt").images
    sagfast.enable(pipe, scale=0.5)
    guided = pipe([2, 6], num_inference_steps=4, latents=_noise(2), output_type="pt").images
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3


def test_demo_writes_png_of_documented_size(tmp_path, capsys):
    from sagfast.cli import main
    from sagfast.demo import digit_demo_size, digit_grid_size

    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--steps", "2"]) == 0
    img = Image.open(out)
    img.verify()
    img = Image.open(out)
    # Two panels (UNet, DiT), each under a 24 px title bar, with 6 columns: no guidance, CFG,
    # CFG + SAG exact, CFG + SAG batched, the SAG mask over the digit, |SAG - CFG| x4.
    assert img.size == digit_demo_size() == (digit_grid_size(6)[0], 2 * (24 + digit_grid_size(6)[1])) == (636, 2128)
    assert img.mode == "RGB"
    printed = capsys.readouterr().out
    for model in ("unet", "dit"):
        for column in ("no guidance", "CFG g=3", "CFG+SAG exact", "CFG+SAG batched"):
            assert f"{model}: {column}" in printed
    arr = np.asarray(img, dtype=np.float32)
    cell, left, top = 96, 36, 40
    for panel in range(2):
        y0 = panel * (24 + 1040) + 24 + top
        digits = arr[y0 : y0 + 10 * 100, left : left + 4 * 100].mean(axis=-1)
        assert digits.std() > 20  # the digit columns are not blank
        mask = arr[y0 : y0 + 10 * 100, left + 4 * 100 : left + 4 * 100 + cell]
        red = (mask[..., 0] == 255) & (mask[..., 1] < mask[..., 0] - 60)
        assert red.any() and not red.all()  # the mask marks some pixels of the map, not all
        diff = arr[y0 : y0 + 10 * 100, left + 5 * 100 : left + 5 * 100 + cell].mean(axis=-1)
        assert diff.min() < 255  # SAG changed some pixels (dark on white; 2 steps change little)


BAD_OPTIONS = [
    (["--steps", "0"], "argument --steps: a positive integer expected, got 0"),
    (["--steps", "x"], "argument --steps: a positive integer expected, got 'x'"),
    (["--guidance", "nan"], "argument --guidance: a finite number >= 0 expected, got nan"),
    (["--sag-scale", "-1"], "argument --sag-scale: a finite number >= 0 expected, got -1"),
    (["--samples", "0"], "argument --samples: a positive integer expected, got 0"),
    (["--scheduler", "bogus"], "argument --scheduler: 'bogus' is not one of ddim"),
    (["--out", "/no/such/folder/x.png"], "argument --out: the folder /no/such/folder does not exist"),
    (["--out", "x.jpg"], "argument --out: a .png path expected"),
    (["--model", "/no/such/model", "--prompt", "a"], "argument --model: /no/such/model is not a local diffusers pipeline folder"),
    (["--prompt", "a cat"], "argument --prompt: needs --model DIR"),
    (["--height", "64"], "argument --height: only with --model DIR"),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_demo_refuses_a_bad_option_before_any_work(options, message, capsys, monkeypatch):
    from sagfast import cli

    monkeypatch.setattr(cli, "_demo", lambda args: pytest.fail("the demo ran"))
    with pytest.raises(SystemExit) as exit:
        cli.main(["demo", *options])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "usage: sagfast" in err and message in err


def test_demo_takes_zero_as_zero(monkeypatch):
    from sagfast import cli, demo

    seen = {}
    monkeypatch.setattr(demo, "demo_digits", lambda out, **kw: seen.update(kw))
    assert cli.main(["demo", "--guidance", "0", "--sag-scale", "0"]) == 0
    assert seen["guidance"] == 0.0 and seen["sag_scale"] == 0.0


def test_help_does_not_import_torch():
    import subprocess

    code = "import sys; from sagfast.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().endswith("False"), done.stderr


def test_training_script_is_reproducible(tmp_path):
    """Two runs of the training script with the same seed write identical weights (a few steps)."""
    from safetensors.torch import load_file

    from sagfast.digits import train

    args = ["--steps", "2", "--batch-size", "8", "--classifier-epochs", "1", "--log-every", "1", "--fp32"]
    for run in ("a", "b"):
        assert train.main(args + ["--out", str(tmp_path / run)]) == 0
    for name in ("digits_unet.safetensors", "digits_class_embedding.safetensors", "digits_classifier.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    log = json.loads((tmp_path / "a" / "digits_train.json").read_text())
    assert log["args"]["steps"] == 2
    # the written weights load as a working pipeline
    pipe = load_pipeline(weights_dir=tmp_path / "a", progress=False)
    assert pipe([5], num_inference_steps=1, output_type="pt").images.shape == (1, 1, 32, 32)


def test_frechet_distance():
    from bench.quality import frechet

    rng = np.random.default_rng(0)
    cov = np.cov(rng.normal(size=(500, 4)), rowvar=False)
    mu = np.zeros(4)
    assert abs(frechet(mu, cov, mu, cov)) < 1e-6
    shift = np.array([1.0, 2.0, 0.0, 0.0])
    assert frechet(mu, cov, shift, cov) == pytest.approx(5.0, abs=1e-6)
    # different covariances: Tr(C1 + C2 - 2 sqrt(C1 C2)) for diagonal ones
    assert frechet(mu, np.eye(4), mu, 4 * np.eye(4)) == pytest.approx(4.0, abs=1e-6)


def test_quality_benchmark_smoke(tmp_path):
    from bench.quality import run

    record = run(out_dir=tmp_path, n=20, steps=2, scales=(0.5,), sag_only_scales=(0.5,), batch=20, log=lambda *a: None)
    keys = [r["key"] for r in record["rows"]]
    assert keys[:3] == ["real", "none", "cfg"] and "sag_only_0.5" in keys and "cfg_sag_exact_0.5" in keys
    assert "uncond" in keys and "uncond_sag_0.5" in keys
    for r in record["rows"]:
        assert np.isfinite(r["fid"]) and r["fid"] >= 0 and 0 <= r["confident"] <= 1
        if r["key"].startswith("uncond"):  # no digit requested: accuracy blank
            assert r["accuracy"] is None
        else:
            assert 0 <= r["accuracy"] <= 1
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["rows"] == record["rows"] and saved["model"] == "unet"
    assert Image.open(tmp_path / "quality.png").size[0] > 100
    md = (tmp_path / "quality.md").read_text()
    assert "| CFG + SAG exact |" in md and "| unconditional + SAG (exact) |" in md


def test_quality_benchmark_dit_unconditional_smoke(tmp_path):
    from bench.quality import run

    record = run(out_dir=tmp_path, model="dit", rows="uncond", n=10, steps=2, scales=(0.5,), batch=10, log=lambda *a: None)
    assert [r["key"] for r in record["rows"]] == ["real", "uncond", "uncond_sag_0.5"]
    assert record["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert all(np.isfinite(r["fid"]) for r in record["rows"])
    assert json.loads((tmp_path / "quality_dit.json").read_text())["model"] == "dit"
    assert (tmp_path / "quality_dit.md").exists() and (tmp_path / "quality_dit.png").exists()


def test_demo_with_stable_diffusion_folder(tmp_path):
    """`sagfast demo --model DIR --prompt ...` on a real folder: a tiny random SD pipeline (CLIP
    tokenizer and text encoder included) written by `save_pretrained` and loaded by the demo."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from offline_pipeline import tiny_stable_diffusion

    from sagfast.cli import main

    tiny_stable_diffusion().save_pretrained(tmp_path / "sd")
    out = tmp_path / "sd.png"
    assert main(["demo", "--model", str(tmp_path / "sd"), "--prompt", "a", "--prompt", "b", "--steps", "2", "--out", str(out)]) == 0
    img = Image.open(out)
    columns = 3  # CFG, CFG + SAG exact, CFG + SAG batched
    side = 32  # the tiny pipeline's default image size
    assert img.size == (36 + columns * (side + 4), 40 + 2 * (side + 4))


def test_training_refuses_to_overwrite_the_shipped_weights(capsys):
    from sagfast.digits import train

    with pytest.raises(SystemExit) as exit:
        train.main(["--out", str(WEIGHTS_DIR), "--steps", "1"])
    assert exit.value.code == 2
    assert "holds the shipped weights; pass --replace-shipped" in capsys.readouterr().err
