"""SAG with the schedulers diffusers' SAG pipeline rejects (sigma-based ones)."""

import pytest
import torch
import torch.nn.functional as F
from components import prompt_embeds, scheduler_config, sd_components
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    StableDiffusionPipeline,
)
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import gaussian_blur_2d
from recording import recording

import sagfast


def karras_dpmpp_2m(config):
    return DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True, algorithm_type="dpmsolver++")


SCHEDULERS = {
    "euler": EulerDiscreteScheduler.from_config,
    "euler_ancestral": EulerAncestralDiscreteScheduler.from_config,
    "heun": HeunDiscreteScheduler.from_config,
    "lms": LMSDiscreteScheduler.from_config,
    "dpmpp_2m_karras": karras_dpmpp_2m,
    "kdpm2": KDPM2DiscreteScheduler.from_config,  # its second-order evaluations run at interpolated sigmas
}
CALL = dict(num_images_per_prompt=1, height=48, width=40, num_inference_steps=3, output_type="latent")


def make_pipe(name, prediction_type="epsilon"):
    comps = sd_components(prediction_type)
    comps["scheduler"] = SCHEDULERS[name](scheduler_config(prediction_type))
    pipe = StableDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, guidance_scale=7.5):
    pe, ne = prompt_embeds()
    gen = torch.Generator().manual_seed(0)
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=guidance_scale, generator=gen, **CALL).images


def expected_degraded_input(attn, hidden, x, out, abar, latent_hw, map_hw, b):
    """The degraded input (docs/design.md, "What SAG computes", steps 3-5), from the dense attention map
    and diffusers' own blur, independently of sagfast."""
    hs = hidden[:b]
    q, k = attn.to_q(hs), attn.to_k(hs)
    heads = attn.heads
    q = q.view(b, -1, heads, q.shape[-1] // heads).transpose(1, 2)
    k = k.view(b, -1, heads, k.shape[-1] // heads).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
    mass = probs.mean(1).sum(1)
    mask = (mass > 1.0).float().reshape(b, 1, *map_hw)
    mask = F.interpolate(mask, latent_hw)
    eps = out[:b]
    x0 = (x[:b] - (1 - abar) ** 0.5 * eps) / abar**0.5
    blurred = gaussian_blur_2d(x0, 9, 1.0)
    x0d = blurred * mask + x0 * (1 - mask)
    return abar**0.5 * x0d + (1 - abar) ** 0.5 * eps


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_sag_beyond_diffusers(name):
    pipe = make_pipe(name)
    plain = run(pipe)
    sagfast.enable(pipe, scale=0.0)
    zero = run(pipe)
    assert torch.equal(zero, plain), "scale=0 must give exactly the plain pipeline's result"

    sagfast.enable(pipe, scale=0.75)
    inner = pipe.unet
    with recording(pipe) as rec:
        guided_out = run(pipe)
    assert (guided_out - plain).abs().max().item() > 1e-2, "SAG did not change the result"

    # Calls alternate main (2B, with CFG) and degraded (B).
    calls = rec.calls
    b = 2
    assert [c["sample"].shape[0] for c in calls] == [2 * b, b] * (len(calls) // 2)
    latent_hw = tuple(calls[0]["sample"].shape[-2:])
    map_hw = (latent_hw[0] // 2, latent_hw[1] // 2)  # one downsampling in the tiny UNet
    attn = inner.mid_block.attentions[0].transformer_blocks[0].attn1
    # The capture layer runs once per UNet call (main and degraded); keep the main calls' inputs.
    main_hidden = rec.attn_inputs[0::2]
    checked = 0
    for i in range(0, len(calls), 2):
        main, degraded = calls[i], calls[i + 1]
        abar = 1.0 / (1.0 + main["input_sigma"] ** 2)
        with torch.no_grad():
            want = expected_degraded_input(attn, main_hidden[i // 2], main["sample"], main["out"], abar, latent_hw, map_hw, b)
        got = degraded["sample"]
        scale = max(1.0, want.abs().max().item())
        assert (got - want).abs().max().item() <= 1e-5 * scale
        checked += 1
    assert checked >= 3


def test_heun_guides_both_evaluations_of_a_step():
    pipe = make_pipe("heun")
    sagfast.enable(pipe)
    with recording(pipe) as rec:
        run(pipe)
    # 3 steps: Heun evaluates the model 2 * 3 - 1 times; each evaluation is a main + a degraded call.
    assert len(rec.calls) == 2 * (2 * 3 - 1)
    # Heun's second evaluation of a step and the next step's first share a noise level: each
    # evaluation is guided at the sigma the scheduler scaled its input with.
    sigmas = [c["sigma"] for c in rec.calls[0::2]]
    assert sigmas == pipe.scheduler.sigmas[:5].tolist()
    assert sigmas[1] == sigmas[2] and sigmas[0] > sigmas[1] > sigmas[3]


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_prediction_types_run_and_guide(prediction_type):
    pipe = make_pipe("euler", prediction_type)
    plain = run(pipe)
    sagfast.enable(pipe)
    out = run(pipe)
    assert torch.isfinite(out).all()
    assert (out - plain).abs().max().item() > 1e-3
