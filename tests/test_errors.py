"""Bad input gets a clear error that says what was wrong and what is accepted."""

import numpy as np
import pytest
import torch
from components import prompt_embeds, sd_components, sd_pipeline, tiny_unet
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

import sagfast


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(scale=-0.1), "scale must be >= 0, got -0.1"),
        (dict(mode="fast"), "mode must be one of"),
        (dict(mode="both"), "mode must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(blur_kernel_size=4), "blur_kernel_size must be an odd int"),
        (dict(blur_sigma=0), "blur_sigma must be > 0"),
        (dict(scale=float("nan")), "scale must be finite, got nan"),
        (dict(scale=float("inf")), "scale must be finite, got inf"),
        (dict(threshold=float("nan")), "threshold must be finite"),
        (dict(threshold=float("-inf")), "threshold must be finite"),
        (dict(blur_sigma=float("nan")), "blur_sigma must be finite"),
        (dict(blur_sigma=float("inf")), "blur_sigma must be finite"),
        (dict(random_mask_ratio=float("nan")), "random_mask_ratio must be finite"),
        (dict(scale="0.5"), "scale must be a real number"),
        (dict(scale=True), "scale must be a real number"),
        (dict(scale=torch.tensor([[0.5, 0.5]])), "scale must be a real number \\(a 0-d real tensor is accepted\\)"),
        (dict(mask="half"), "mask must be one of"),
        (dict(layers=""), "layers must be"),
    ],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        sagfast.SAGConfig(**overrides)
    pipe = sd_pipeline()
    unet, cls, processors = pipe.unet, type(pipe), dict(pipe.unet.attn_processors)
    with pytest.raises(ValueError, match=message):
        sagfast.enable(pipe, **overrides)
    assert pipe.unet is unet and type(pipe) is cls and not sagfast.is_enabled(pipe), "a failed enable must leave the pipeline untouched"
    assert dict(unet.attn_processors) == processors


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), np.int64(1), torch.tensor(0.5), torch.tensor(1, dtype=torch.int32)])
def test_numpy_and_0d_torch_numbers_are_numbers(value):
    config = sagfast.SAGConfig(scale=value, threshold=value, blur_sigma=value)
    assert type(config.scale) is float and config.scale == float(value) == config.threshold == config.blur_sigma
    assert sagfast.SAGConfig(blur_kernel_size=np.int64(5)).blur_kernel_size == 5


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
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and sagfast.api.ACTIVE_CALL.get() is None


def unusable_flow_scheduler():
    # A flow-matching schedule whose model would not predict the velocity.
    return DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="epsilon")


def test_scheduler_without_a_usable_noise_schedule():
    pipe = sd_pipeline()
    pipe.scheduler = unusable_flow_scheduler()
    with pytest.raises(
        ValueError,
        match="usable noise schedule: DPMSolverMultistepScheduler is a flow-matching schedule with prediction_type='epsilon'; accepted: the velocity",
    ):
        sagfast.enable(pipe)
    assert not sagfast.is_enabled(pipe)


def test_scheduler_swapped_after_enable_is_caught_at_call_time():
    pipe = sagfast.enable(sd_pipeline())
    pipe.scheduler = unusable_flow_scheduler()
    pe, ne = prompt_embeds(1)
    with pytest.raises(ValueError, match="usable noise schedule"):
        pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=16, width=16, num_inference_steps=1, output_type="latent")


def test_config_of_wrong_type():
    with pytest.raises(TypeError, match="config must be a sagfast.SAGConfig"):
        sagfast.enable(sd_pipeline(), {"scale": 0.5})


def test_unknown_pipeline_is_refused_with_the_supported_ones():
    class NoUNet:
        scheduler = None

    with pytest.raises(ValueError, match="does not know the batch layout of NoUNet.*Pipelines it guides.*StableDiffusionXLPipeline"):
        sagfast.enable(NoUNet())


def test_the_unet_outside_a_call_is_the_plain_unet():
    pipe = sagfast.enable(sd_pipeline())
    pe, ne = prompt_embeds(1)
    args = (torch.randn(2, 4, 8, 8), torch.tensor(10))
    with torch.no_grad():
        out = pipe.unet(*args, encoder_hidden_states=torch.cat([ne, pe])).sample
        plain = sd_pipeline().unet(*args, encoder_hidden_states=torch.cat([ne, pe])).sample
    assert torch.equal(out, plain)
