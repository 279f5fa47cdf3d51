"""The embedded digit transformer (DiT, flow matching): shipped weights load offline, every digit class
is generated recognisably under CFG, the null class samples unconditionally, the CFG batch layout and
the model calls are those of diffusers' pipelines, and the training script runs."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from sagfast.digits import DigitDiTPipeline, load_classifier, load_dit_pipeline
from sagfast.digits.weights import WEIGHTS_DIR

NULL = 10
# Fixed noise for the per-class check (one digit per class, CFG 3, 20 steps). With the shipped weights
# the noise of seeds 0..9 gives 9, 10, 9, 9, 10, 10, 10, 8, 10, 9 of 10 (94 of 100; the misses are 8s and
# 9s, read as 3, 2, 4 or 7). Seed 1 gives 10 of 10; the test asks for 9, one miss of slack for other
# CPUs / torch versions.
CLASS_SEED = 1


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Nothing here may touch the network: the weights ship with the package.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIFFUSERS_OFFLINE", "1")
    monkeypatch.delenv("SAGFAST_DIGITS_WEIGHTS", raising=False)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These tests are compute-bound small matmuls: one thread is fastest on a small machine shared with
    # other jobs (two OpenMP threads spin-wait on each other when the other core is busy: 3-10x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    return load_dit_pipeline(progress=False)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def _noise(n, seed=0):
    return torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def _record_calls(model):
    """Forward pre-hook recording (batch, timestep, class_labels) of every transformer call."""
    calls = []

    def hook(module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        calls.append((x.shape[0], kwargs["timestep"].clone(), kwargs["class_labels"].clone()))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_weights_load_offline(pipe):
    from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

    for name in ("digits_dit.safetensors", "digits_dit.json", "digits_dit_scheduler.json", "digits_dit_train.json"):
        assert (WEIGHTS_DIR / name).is_file(), f"{name} missing from {WEIGHTS_DIR}"
    assert (WEIGHTS_DIR / "digits_dit.safetensors").stat().st_size <= 5 * 10**6
    assert isinstance(pipe, DigitDiTPipeline)
    assert set(pipe.components) == {"transformer", "scheduler"}
    assert isinstance(pipe.transformer, DiTTransformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    cfg = pipe.transformer.config
    assert (cfg.in_channels, cfg.out_channels, cfg.sample_size, cfg.patch_size) == (1, 1, 32, 2)
    assert cfg.norm_type == "ada_norm_zero" and cfg.num_embeds_ada_norm == 10 and pipe.null_class == NULL
    assert pipe.scheduler.config.shift == 1.0
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters())
    assert not pipe.transformer.training
    record = json.loads((WEIGHTS_DIR / "digits_dit_train.json").read_text())
    assert record["parameters"] == sum(p.numel() for p in pipe.transformer.parameters())


def test_every_class_recognised_under_cfg(pipe, classifier):
    """The transformer is really trained: one digit per class at CFG 3, 20 steps (chance is 10%)."""
    labels = list(range(10))
    images = pipe(labels, num_inference_steps=20, guidance_scale=3.0, latents=_noise(10, CLASS_SEED)).images
    assert images.shape == (10, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        pred = classifier(images).argmax(1)
    right = (pred == torch.tensor(labels)).sum().item()
    assert right >= 9, f"only {right}/10 classes recognised: asked {labels}, classifier saw {pred.tolist()}"


def test_null_class_samples_unconditionally(pipe, classifier):
    """Class 10 is the null class: without guidance it samples the unconditional model, whose digits
    (mostly) look like some digit; with guidance the null class is the uncond branch of itself."""
    out = pipe([NULL] * 4, num_inference_steps=10, guidance_scale=1.0, latents=_noise(4, 1)).images
    assert out.shape == (4, 1, 32, 32) and torch.isfinite(out).all()
    assert out.std() > 0.3  # not a blank or grey field: strokes on background
    with torch.no_grad():
        confidence = classifier(out).softmax(1).max(1).values
    assert (confidence > 0.5).sum() >= 2
    # under CFG the null class's cond and uncond rows are the same, so g does not change the result
    guided = pipe([NULL] * 2, num_inference_steps=3, guidance_scale=3.0, latents=_noise(2, 1)).images
    plain = pipe([NULL] * 2, num_inference_steps=3, guidance_scale=1.0, latents=_noise(2, 1)).images
    torch.testing.assert_close(guided, plain, atol=1e-4, rtol=0)


def test_guidance_1_makes_batch_b_calls(pipe):
    calls, hook = _record_calls(pipe.transformer)
    try:
        pipe([3, 7, 1], num_inference_steps=4, guidance_scale=1.0, latents=_noise(3))
    finally:
        hook.remove()
    assert not pipe.do_classifier_free_guidance and pipe.guidance_scale == 1.0
    assert [c[0] for c in calls] == [3] * 4
    assert all(c[2].tolist() == [3, 7, 1] for c in calls)


def test_cfg_batch_layout_and_timesteps(pipe):
    calls, hook = _record_calls(pipe.transformer)
    try:
        pipe([3, 7], num_inference_steps=4, guidance_scale=3.0, latents=_noise(2))
    finally:
        hook.remove()
    assert pipe.do_classifier_free_guidance and pipe.guidance_scale == 3.0
    assert [c[0] for c in calls] == [4] * 4
    assert all(c[2].tolist() == [NULL, NULL, 3, 7] for c in calls)  # [uncond, cond]
    # a 1-D timestep per row: the scheduler's timesteps, sigma * 1000, from 1000 down
    sched_t = pipe.scheduler.timesteps
    for (_, t, _), ref in zip(calls, sched_t):
        assert t.shape == (4,) and torch.all(t == ref)
    assert sched_t[0] == 1000.0


def test_matches_manual_flow_matching_euler(pipe):
    """The pipeline is Euler on v = u + g (c - u) over the scheduler's sigmas."""
    g, steps, labels = 2.5, 3, torch.tensor([4, 9])
    x = _noise(2, 5)
    out = pipe(labels.tolist(), num_inference_steps=steps, guidance_scale=g, latents=x.clone(), output_type="latent").images
    sigmas = pipe.scheduler.sigmas
    with torch.no_grad():
        for i in range(steps):
            t = (sigmas[i] * 1000).expand(4)
            v = pipe.transformer(
                hidden_states=torch.cat([x, x]),
                timestep=t,
                class_labels=torch.cat([torch.full_like(labels, NULL), labels]),
                return_dict=False,
            )[0]
            u, c = v.chunk(2)
            x = x + (sigmas[i + 1] - sigmas[i]) * (u + g * (c - u))
    torch.testing.assert_close(out, x, atol=1e-4, rtol=1e-4)


def test_output_types_and_generator(pipe):
    kw = dict(num_inference_steps=2, guidance_scale=3.0)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    pt = pipe([1, 7], generator=gen(), **kw).images
    assert pt.shape == (2, 1, 32, 32) and pt.min() >= -1 and pt.max() <= 1
    latent = pipe([1, 7], generator=gen(), output_type="latent", **kw).images
    torch.testing.assert_close(latent.clamp(-1, 1), pt)
    pil = pipe([1, 7], generator=gen(), output_type="pil", **kw).images
    assert len(pil) == 2 and pil[0].size == (32, 32) and pil[0].mode == "L"
    assert np.array_equal(np.asarray(pil[1]), ((pt[1, 0].numpy() + 1) / 2 * 255).round().astype(np.uint8))
    other = pipe([1, 7], generator=torch.Generator().manual_seed(4), **kw).images
    assert not torch.equal(pt, other)
    tup = pipe([1, 7], generator=gen(), return_dict=False, **kw)
    assert isinstance(tup, tuple) and torch.equal(tup[0], pt)


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="digits 0..9"):
        pipe([3, 11], num_inference_steps=1)
    with pytest.raises(ValueError, match="shape"):
        pipe([3], num_inference_steps=1, latents=_noise(2))
    with pytest.raises(ValueError, match="output_type"):
        pipe([3], num_inference_steps=1, output_type="jpg")


def test_training_script_steps3(tmp_path, monkeypatch):
    """`python -m sagfast.digits.train --model dit --steps 3` writes a loadable model into --out and
    leaves the shipped weights alone; the same seed gives the same weights."""
    from safetensors.torch import load_file

    from sagfast.digits import train

    data = train.load_mnist()  # the real digits, parsed once for both runs (a few seconds each)
    monkeypatch.setattr(train, "load_mnist", lambda: data)
    shipped = {p.name: _sha(p) for p in WEIGHTS_DIR.iterdir() if p.is_file()}
    args = ["--model", "dit", "--steps", "3", "--batch-size", "8", "--log-every", "1", "--fp32"]
    for run in ("a", "b"):
        assert train.main(args + ["--out", str(tmp_path / run)]) == 0
    a = load_file(str(tmp_path / "a" / "digits_dit.safetensors"))
    b = load_file(str(tmp_path / "b" / "digits_dit.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "a" / "digits_dit_train.json").read_text())
    assert record["args"]["steps"] == 3 and record["args"]["model"] == "dit"
    assert np.isfinite(record["final_loss_ema"]) and record["parameters"] > 0
    assert {p.name: _sha(p) for p in WEIGHTS_DIR.iterdir() if p.is_file()} == shipped
    pipe = load_dit_pipeline(weights_dir=tmp_path / "a", progress=False)
    out = pipe([5, NULL], num_inference_steps=1).images
    assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("guidance", [3.0, 1.0], ids=["cfg", "nocfg"])
def test_sag_exact_and_batched_run_and_change_the_output(guidance):
    import sagfast

    pipe = load_dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    labels = [3, 8] if guidance > 1 else [10, 10]  # without CFG: the null class, unconditional sampling
    kwargs = dict(num_inference_steps=6, guidance_scale=guidance, output_type="latent")
    plain = pipe(labels, latents=_noise(2), **kwargs).images
    calls = {}
    for mode in ("exact", "batched"):
        sagfast.enable(pipe, scale=0.75, mode=mode)
        recorded, handle = _record_calls(pipe.transformer)
        try:
            out = pipe(labels, latents=_noise(2), **kwargs).images
        finally:
            handle.remove()
        calls[mode] = [batch for batch, _, _ in recorded]
        assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-2
    full = 4 if guidance > 1 else 2
    assert calls["exact"] == [full, 2] * 6
    assert calls["batched"] == [full, 2] + [full + 2] * 5  # the first step (sigma = 1) exact, then one call
    sagfast.disable(pipe)
    assert torch.equal(pipe(labels, latents=_noise(2), **kwargs).images, plain)
