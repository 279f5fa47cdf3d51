"""`sagfast.modular.batch_guidance`: every guider condition of a modular pipeline's step in one model
call, with the same final latents as diffusers' own loop (one model pass per condition).

The pipeline is diffusers' modular SDXL (`StableDiffusionXLAutoBlocks`, its text-encoder block
dropped: it takes prompt embeddings) on tiny random components. Every guider runs as diffusers ships
it, defects included: SmoothedEnergyGuidance never installs its hook (its `prepare_models` does not
count batches), so its third condition is the cond rows unperturbed, batched or not.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.guiders import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
    PerturbedAttentionGuidance,
    SkipLayerGuidance,
    SmoothedEnergyGuidance,
)
from diffusers.hooks import LayerSkipConfig
from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig
from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks
from test_pipelines import POOLED, TOKENS, sdxl_pipeline

from sagfast.modular import batch_guidance, unbatch_guidance

STEPS = 4
MID = "mid_block.attentions.0.transformer_blocks"

GUIDERS = {
    "cfg": lambda: ClassifierFreeGuidance(guidance_scale=5.0),
    "pag": lambda: PerturbedAttentionGuidance(
        guidance_scale=5.0,
        perturbed_guidance_scale=3.0,
        perturbed_guidance_start=0.0,
        perturbed_guidance_stop=1.0,
        perturbed_guidance_config=LayerSkipConfig(indices=[0], fqn=MID, skip_attention=False, skip_attention_scores=True),
    ),
    "skip-layer": lambda: SkipLayerGuidance(
        guidance_scale=5.0,
        skip_layer_guidance_scale=2.0,
        skip_layer_guidance_start=0.0,
        skip_layer_guidance_stop=1.0,
        skip_layer_config=LayerSkipConfig(indices=[0], fqn=MID),
    ),
    "smoothed-energy": lambda: SmoothedEnergyGuidance(
        guidance_scale=5.0, seg_guidance_scale=3.0, seg_guidance_config=SmoothedEnergyGuidanceConfig(indices=[0], fqn=MID)
    ),
    "apg": lambda: AdaptiveProjectedGuidance(guidance_scale=5.0, adaptive_projected_guidance_momentum=-0.5, eta=0.0),
    "cfg-zero-star": lambda: ClassifierFreeZeroStarGuidance(guidance_scale=5.0),
}


def modular_sdxl(guider):
    std = sdxl_pipeline()
    blocks = StableDiffusionXLAutoBlocks()
    blocks.sub_blocks.pop("text_encoder")
    pipe = blocks.init_pipeline()
    pipe.update_components(unet=std.unet, vae=std.vae, scheduler=std.scheduler, guider=guider)
    return pipe


def inputs():
    g = torch.Generator().manual_seed(3)
    return dict(
        prompt_embeds=torch.randn(1, TOKENS, 64, generator=g),
        negative_prompt_embeds=torch.randn(1, TOKENS, 64, generator=g),
        pooled_prompt_embeds=torch.randn(1, POOLED, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, POOLED, generator=g),
        latents=torch.randn(1, 4, 24, 20, generator=g),
        num_inference_steps=STEPS,
        height=48,
        width=40,
        output="latents",
    )


def run(pipe):
    sizes = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(args[0].shape[0]), with_kwargs=True)
    try:
        out = pipe(**inputs())
    finally:
        handle.remove()
    return out, sizes


@pytest.mark.parametrize("name", list(GUIDERS))
def test_batched_conditions_equal_diffusers_loop_in_one_call_per_step(name):
    pipe = modular_sdxl(GUIDERS[name]())
    want, unbatched_sizes = run(pipe)
    batch_guidance(pipe)
    got, sizes = run(pipe)
    assert len(sizes) == STEPS, sizes  # one model call per step
    assert sum(sizes) == sum(unbatched_sizes)  # the same rows
    bound = 1e-5 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    unbatch_guidance(pipe)
    again, sizes = run(pipe)
    assert sizes == unbatched_sizes and torch.equal(again, want)


def test_the_perturbation_reaches_its_own_rows_only():
    # PAG's condition is perturbed and the others are not: batched PAG differs from batched CFG with the
    # same CFG scale by far more than the bound above (a join that perturbed every row, or none, fails).
    def pag_guider(scale):
        config = LayerSkipConfig(indices=[0], fqn=MID, skip_attention=False, skip_attention_scores=True)
        return PerturbedAttentionGuidance(
            guidance_scale=5.0,
            perturbed_guidance_scale=scale,
            perturbed_guidance_start=0.0,
            perturbed_guidance_stop=1.0,
            perturbed_guidance_config=config,
        )

    pag, cfg = modular_sdxl(pag_guider(10.0)), modular_sdxl(pag_guider(0.0))
    want, _ = run(pag)
    batch_guidance(pag)
    batch_guidance(cfg)
    got, _ = run(pag)
    plain, _ = run(cfg)
    bound = 1e-5 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    assert (got - plain).abs().max().item() > 100 * bound


def test_a_pipeline_without_a_guided_loop_is_refused():
    from diffusers.modular_pipelines import SequentialPipelineBlocks

    with pytest.raises(ValueError, match="no denoise loop block"):
        batch_guidance(SequentialPipelineBlocks().init_pipeline())


@pytest.mark.parametrize("function", [batch_guidance, unbatch_guidance])
def test_a_standard_pipeline_is_refused_saying_what_is_taken(function):
    pipe = sdxl_pipeline()
    message = rf"sagfast.modular.{function.__name__} takes a diffusers modular pipeline .* got StableDiffusionXLPipeline; .*sagfast.enable"
    with pytest.raises(ValueError, match=message):
        function(pipe)
