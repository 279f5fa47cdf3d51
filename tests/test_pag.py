"""PAG in the guided denoiser: parity with diffusers' own PAG pipelines on tiny random components.

`sagfast.enable(plain_pipe, scale=0, pag_scale=3.0, pag_layers=...)` on a plain pipeline must give the
final latents of diffusers' PAG pipeline for the same components, seed and arguments (fp32, max abs
diff <= 1e-4 * max(1, max |ref|)): SD 1.x and SDXL (DDIM and Euler) and SD3 (flow matching), CFG on
and off, adaptive scale 0 and 0.1, the default "mid" layer and another one; PixArt-Sigma (constant
scale). Every case also checks
that PAG changes the output, so a parity that holds because nothing happened cannot pass.

DDIM runs with `timestep_spacing="trailing"` (first timestep 999): with the default spacing the
first timestep is 751, and the adaptive rule max(3 - 0.1 * (1000 - t), 0) is 0 at every step.
"""

import pytest
import torch
from components import prompt_embeds, sd_components
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    PixArtSigmaPAGPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3PAGPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPAGPipeline,
)
from test_families import call_kwargs as pixart_kwargs
from test_families import pixart
from test_families_flow import embeds, sd3
from test_pipelines import POOLED, sdxl_pipeline

import sagfast

TOKENS = 8


def fresh(scheduler):
    return type(scheduler).from_config(scheduler.config)


def sd_pair(scheduler_cls, layers):
    components = sd_components(scheduler_cls=scheduler_cls)
    if scheduler_cls is DDIMScheduler:
        components["scheduler"] = DDIMScheduler.from_config(components["scheduler"].config, timestep_spacing="trailing")
    reference = StableDiffusionPAGPipeline(**components, pag_applied_layers=layers)
    pipe = StableDiffusionPipeline(**dict(components, scheduler=fresh(components["scheduler"])))
    pe, ne = prompt_embeds(2)
    return reference, pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=48, width=40)


def sdxl_pair(scheduler_cls, layers):
    pipe = sdxl_pipeline()
    spacing = dict(timestep_spacing="trailing") if scheduler_cls is DDIMScheduler else {}
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **spacing)
    components = dict(pipe.components)
    reference = StableDiffusionXLPAGPipeline(**dict(components, scheduler=fresh(pipe.scheduler)), pag_applied_layers=layers)
    g = torch.Generator().manual_seed(3)
    call = dict(
        prompt_embeds=torch.randn(1, TOKENS, 64, generator=g),
        negative_prompt_embeds=torch.randn(1, TOKENS, 64, generator=g),
        pooled_prompt_embeds=torch.randn(1, POOLED, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, POOLED, generator=g),
        height=48,
        width=40,
    )
    return reference, pipe, call


def sd3_pair(scheduler_cls, layers):
    pipe = sd3()
    components = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    reference = StableDiffusion3PAGPipeline(**dict(components, scheduler=fresh(pipe.scheduler)), pag_applied_layers=layers)
    pe, pooled = embeds(n=1, seed=1)
    ne, npooled = embeds(n=1, seed=2)
    call = dict(
        prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt_embeds=ne, negative_pooled_prompt_embeds=npooled, height=24, width=20
    )
    return reference, pipe, call


PAIRS = {"sd": sd_pair, "sdxl": sdxl_pair, "sd3": sd3_pair}
# (pipeline, scheduler, PAG layers): diffusers' default layer of each pipeline and another one.
SETUPS = [
    ("sd", DDIMScheduler, ["mid"]),
    ("sd", EulerDiscreteScheduler, ["mid"]),
    ("sd", EulerDiscreteScheduler, ["down_blocks.1"]),
    ("sdxl", DDIMScheduler, ["mid"]),
    ("sdxl", EulerDiscreteScheduler, ["mid"]),
    ("sdxl", EulerDiscreteScheduler, ["up_blocks.0.attentions.0"]),
    ("sd3", None, ["blocks.1"]),
    ("sd3", None, ["transformer_blocks.0", "transformer_blocks.2"]),
]


def latents(pipe, call, cfg_on, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=4,
        output_type="latent",
        guidance_scale=5.0 if cfg_on else 1.0,
        **call,
        **kwargs,
    )
    return out.images


@pytest.mark.parametrize("adaptive", [0.0, 0.1], ids=["const", "adaptive"])
@pytest.mark.parametrize("cfg_on", [True, False], ids=["cfg", "nocfg"])
@pytest.mark.parametrize(
    "name, scheduler_cls, layers", SETUPS, ids=[f"{n}-{s.__name__[:5] if s else 'flow'}-{'+'.join(x)}" for n, s, x in SETUPS]
)
def test_pag_matches_diffusers_pag_pipeline(name, scheduler_cls, layers, cfg_on, adaptive):
    reference, pipe, call = PAIRS[name](scheduler_cls, layers)
    want = latents(reference, call, cfg_on, pag_scale=3.0, pag_adaptive_scale=adaptive)
    plain = latents(pipe, call, cfg_on)
    sagfast.enable(pipe, scale=0, pag_scale=3.0, pag_layers=layers, pag_adaptive_scale=adaptive)
    got = latents(pipe, call, cfg_on)
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    assert (plain - want).abs().max().item() > 100 * bound  # PAG did something


@pytest.mark.parametrize("cfg_on", [True, False], ids=["cfg", "nocfg"])
def test_pag_matches_diffusers_pixart_sigma_pag_pipeline(cfg_on):
    # Constant scale only: diffusers' PixArtSigmaPAGPipeline passes its per-row timestep to the adaptive
    # rule, which then fails ("Boolean value of Tensor with more than one value is ambiguous").
    components = pixart().components
    scheduler = DDIMScheduler.from_config(components["scheduler"].config, timestep_spacing="trailing")
    reference = PixArtSigmaPAGPipeline(**dict(components, scheduler=scheduler), pag_applied_layers=["blocks.1"])
    pipe = PixArtSigmaPipeline(**dict(components, scheduler=fresh(scheduler)))
    call = pixart_kwargs("pixart", cfg_on)
    del call["generator"], call["num_inference_steps"], call["guidance_scale"], call["output_type"]
    want = latents(reference, call, cfg_on, pag_scale=3.0)
    plain = latents(pipe, call, cfg_on)
    sagfast.enable(pipe, scale=0, pag_scale=3.0, pag_layers=["blocks.1"])
    got = latents(pipe, call, cfg_on)
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    assert (plain - want).abs().max().item() > 100 * bound


def test_pipeline_processors_are_back_after_pag():
    reference, pipe, call = sd_pair(EulerDiscreteScheduler, ["mid"])
    before = dict(pipe.unet.attn_processors)
    sagfast.enable(pipe, scale=0.5, pag_scale=3.0)
    latents(pipe, call, True)
    sagfast.disable(pipe)
    assert pipe.unet.attn_processors == before


def test_a_pag_pipeline_leaves_another_pipeline_on_the_same_unet_alone():
    # PAG's switches stay on the shared UNet's PAG layers while the PAG pipeline is enabled: dormant
    # for the other pipeline's calls, whose results are what they were before.
    reference, pipe, call = sd_pair(EulerDiscreteScheduler, ["mid"])
    other = StableDiffusionPipeline(**dict(pipe.components, scheduler=fresh(pipe.scheduler)))
    sagfast.enable(other, scale=0.75, mode="batched")
    before = latents(other, call, True)
    sagfast.enable(pipe, scale=0.75, pag_scale=3.0, pag_layers=["mid", "up_blocks.0"])
    with_pag = latents(pipe, call, True)
    assert torch.equal(latents(other, call, True), before)
    assert (with_pag - before).abs().max() > 1e-2
