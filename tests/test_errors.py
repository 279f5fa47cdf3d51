"""Bad input gets a clear error that says what was wrong and what is accepted."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline

import sagfast
from components import prompt_embeds, sd_components, sd_pipeline, tiny_unet


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(scale=-0.1), "scale must be a number >= 0"),
        (dict(mode="fast"), "mode must be one of"),
        (dict(mode="both"), "mode must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(blur_kernel_size=4), "blur_kernel_size must be an odd int"),
        (dict(blur_sigma=0), "blur_sigma must be a number > 0"),
        (dict(mask="half"), "mask must be one of"),
        (dict(layers=""), "layers must be"),
    ],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        sagfast.SAGConfig(**overrides)
    pipe = sd_pipeline()
    unet = pipe.unet
    with pytest.raises(ValueError, match=message):
        sagfast.enable(pipe, **overrides)
    assert pipe.unet is unet, "a failed enable must leave the pipeline untouched"


def test_unknown_override_field():
    with pytest.raises(ValueError, match=r"unknown SAGConfig field\(s\) \['sag_scale'\]; accepted: "):
        sagfast.enable(sd_pipeline(), sag_scale=0.5)


def test_unknown_layer_name_lists_the_self_attention_layers():
    with pytest.raises(ValueError, match="has none there. Self-attention layers it has: .*attn1"):
        sagfast.enable(sd_pipeline(), layers="down_blocks.0.attentions.0.transformer_blocks.0.attn1")


def test_cross_attention_layer_is_refused():
    with pytest.raises(ValueError, match="needs a self-attention layer"):
        sagfast.enable(sd_pipeline(), layers="mid_block.attentions.0.transformer_blocks.0.attn2")


def test_unet_without_mid_block_attention():
    comps = sd_components()
    comps["unet"] = tiny_unet(mid_block_type=None)
    pipe = StableDiffusionPipeline(**comps)
    with pytest.raises(ValueError, match="first self-attention of the mid block"):
        sagfast.enable(pipe)
    assert pipe.unet is comps["unet"]


def test_latents_too_small_for_the_blur():
    pipe = sagfast.enable(sd_pipeline())
    pe, ne = prompt_embeds(1)
    # 16x16 pixels -> 8x8 latent is fine for kernel 9 (needs >= 5); 8x8 pixels -> 4x4 is not.
    with pytest.raises(ValueError, match=r"latent 4x4 is too small for a blur of kernel size 9.*>= 5"):
        pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=8, width=8, num_inference_steps=1, output_type="latent")
    unet = pipe.unet.unet
    assert type(unet.mid_block.attentions[0].transformer_blocks[0].attn1.processor).__name__ == "AttnProcessor2_0"


def test_scheduler_without_a_usable_noise_schedule():
    pipe = sd_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="usable noise schedule: FlowMatchEulerDiscreteScheduler has no alphas_cumprod"):
        sagfast.enable(pipe)


def test_scheduler_swapped_after_enable_is_caught_at_call_time():
    pipe = sagfast.enable(sd_pipeline())
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    pe, ne = prompt_embeds(1)
    with pytest.raises(ValueError, match="usable noise schedule"):
        pipe.unet(torch.randn(2, 4, 8, 8), torch.tensor(10), encoder_hidden_states=torch.cat([ne, pe]))


def test_config_of_wrong_type():
    with pytest.raises(TypeError, match="config must be a sagfast.SAGConfig"):
        sagfast.enable(sd_pipeline(), {"scale": 0.5})


def test_pipeline_without_unet():
    class NoUNet:
        scheduler = None

    with pytest.raises(ValueError, match="has no `unet`"):
        sagfast.enable(NoUNet())


def test_guided_unet_called_outside_a_pipeline_call():
    pipe = sagfast.enable(sd_pipeline())
    pe, ne = prompt_embeds(1)
    with pytest.raises(RuntimeError, match="called outside a StableDiffusionPipeline call"):
        pipe.unet(torch.randn(2, 4, 8, 8), torch.tensor(10), encoder_hidden_states=torch.cat([ne, pe]))
