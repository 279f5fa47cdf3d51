"""Parity with diffusers' own StableDiffusionSAGPipeline on tiny random components (fp32)."""

import pytest
import torch
from components import prompt_embeds, sd_components
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
    StableDiffusionSAGPipeline as DiffusersSAG,
)

import sagfast

SCHEDULERS = [DDIMScheduler, DDPMScheduler, PNDMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler]
# 2 prompts x 2 images per prompt, non-square 64x48 pixels -> 32x24 latent -> 16x12 mid-block map.
CALL = dict(num_images_per_prompt=2, height=64, width=48, num_inference_steps=4, output_type="latent")


def run(pipe, guidance_scale, **extra):
    pe, ne = prompt_embeds()
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=guidance_scale, generator=gen, **CALL, **extra).images


def tolerance(ref):
    # SDPA against diffusers' bmm attention alone differs by ~1e-4 at latent magnitude ~70; a mask bit
    # flipping at the threshold would show as a far larger difference.
    return 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scheduler_cls", SCHEDULERS, ids=lambda c: c.__name__)
def test_parity_with_diffusers(scheduler_cls, prediction_type, guidance_scale):
    comps = sd_components(prediction_type, scheduler_cls)
    ref = run(DiffusersSAG(**comps), guidance_scale, sag_scale=0.75)

    pipe = StableDiffusionPipeline(**comps)
    plain = run(pipe, guidance_scale)
    sagfast.enable(pipe, scale=0.75)
    enabled = run(pipe, guidance_scale)
    dropin = run(sagfast.StableDiffusionSAGPipeline(**comps), guidance_scale, sag_scale=0.75)

    tol = tolerance(ref)
    diff_enabled = (enabled - ref).abs().max().item()
    diff_dropin = (dropin - ref).abs().max().item()
    print(
        f"{scheduler_cls.__name__} {prediction_type} g={guidance_scale}: enable {diff_enabled:.3g}, "
        f"drop-in {diff_dropin:.3g}, tol {tol:.3g}, max|ref| {ref.abs().max().item():.3g}"
    )
    assert diff_enabled <= tol
    assert diff_dropin <= tol
    # SAG really acted: the reference is far from the unguided result.
    assert (ref - plain).abs().max().item() > 100 * tol


def test_dropin_defaults_match_diffusers_signature():
    import inspect

    ours = inspect.signature(sagfast.StableDiffusionSAGPipeline.__call__).parameters
    theirs = inspect.signature(DiffusersSAG.__call__).parameters
    for name, param in theirs.items():
        assert name in ours, name
        assert ours[name].default == param.default, name
    assert ours["num_inference_steps"].default == 50
    assert ours["guidance_scale"].default == 7.5
    assert ours["sag_scale"].default == 0.75


def test_dropin_from_pipe_of_enabled_pipeline():
    comps = sd_components()
    pipe = StableDiffusionPipeline(**comps)
    sagfast.enable(pipe)
    dropin = sagfast.StableDiffusionSAGPipeline.from_pipe(pipe)
    assert dropin.unet is comps["unet"]
    ref = run(DiffusersSAG(**comps), 7.5, sag_scale=0.5)
    out = run(dropin, 7.5, sag_scale=0.5)
    assert (out - ref).abs().max().item() <= tolerance(ref)
