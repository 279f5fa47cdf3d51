"""SAG on other diffusers pipelines: SDXL (added_cond_kwargs sliced), ControlNet (residuals sliced),
img2img, inpaint."""

import torch
from components import TOKENS, prompt_embeds, scheduler_config, sd_components, tiny_unet, tiny_vae
from diffusers import (
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLPipeline,
)
from recording import recording

import sagfast

POOLED = 32


def sdxl_pipeline():
    unet = tiny_unet(
        cross_attention_dim=64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + POOLED,
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(scheduler_config()),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def first_step_calls_with_sag(pipe, call):
    """Runs `pipe` plain, then with SAG enabled (same seed); checks that SAG changed the result and
    returns the recorded main and degraded UNet calls of the first step."""
    plain = pipe(generator=torch.Generator().manual_seed(0), **call).images
    sagfast.enable(pipe)
    with recording(pipe) as rec:
        out = pipe(generator=torch.Generator().manual_seed(0), **call).images
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3
    return rec.calls[0], rec.calls[1]


def test_sdxl_slices_added_cond_kwargs_for_the_degraded_pass():
    pipe = sdxl_pipeline()
    g = torch.Generator().manual_seed(3)
    emb = dict(
        prompt_embeds=torch.randn(2, TOKENS, 64, generator=g),
        negative_prompt_embeds=torch.randn(2, TOKENS, 64, generator=g),
        pooled_prompt_embeds=torch.randn(2, POOLED, generator=g),
        negative_pooled_prompt_embeds=torch.randn(2, POOLED, generator=g),
    )
    call = dict(height=48, width=40, num_inference_steps=2, output_type="latent", **emb)
    main, degraded = first_step_calls_with_sag(pipe, call)
    assert main["sample"].shape[0] == 4 and degraded["sample"].shape[0] == 2
    for key in ("text_embeds", "time_ids"):
        full = main["kwargs"]["added_cond_kwargs"][key]
        part = degraded["kwargs"]["added_cond_kwargs"][key]
        assert full.shape[0] == 4 and torch.equal(part, full[:2]), key
    # The guide branch is the unconditional one: its text embeddings are the negative prompt's.
    assert torch.equal(degraded["kwargs"]["encoder_hidden_states"], main["kwargs"]["encoder_hidden_states"][:2])
    assert torch.equal(degraded["kwargs"]["added_cond_kwargs"]["text_embeds"], emb["negative_pooled_prompt_embeds"])


def _image():
    return torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(5)) * 2 - 1


def test_img2img_runs_with_sag():
    pipe = StableDiffusionImg2ImgPipeline(**sd_components())
    pipe.set_progress_bar_config(disable=True)
    pe, ne = prompt_embeds(1)
    call = dict(prompt_embeds=pe, negative_prompt_embeds=ne, image=_image(), strength=0.75, num_inference_steps=4, output_type="latent")
    plain = pipe(generator=torch.Generator().manual_seed(0), **call).images
    with sagfast.guided(pipe):
        out = pipe(generator=torch.Generator().manual_seed(0), **call).images
    assert out.shape == plain.shape == (1, 4, 32, 24)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3


def test_inpaint_with_a_nine_channel_unet_runs_with_sag():
    comps = sd_components()
    comps["unet"] = tiny_unet(in_channels=9)
    pipe = StableDiffusionInpaintPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    pe, ne = prompt_embeds(1)
    mask = torch.zeros(1, 1, 64, 48)
    mask[..., 16:48, 8:40] = 1
    call = dict(
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        image=_image(),
        mask_image=mask,
        height=64,
        width=48,
        num_inference_steps=3,
        output_type="latent",
    )
    main, degraded = first_step_calls_with_sag(pipe, call)
    # The degraded input re-noises the 4 latent channels and keeps the guide rows' mask + masked image.
    assert degraded["sample"].shape == (1, 9, 32, 24)
    assert torch.equal(degraded["sample"][:, 4:], main["sample"][:1, 4:])
    assert not torch.equal(degraded["sample"][:, :4], main["sample"][:1, :4])


def test_controlnet_residuals_are_sliced_for_the_degraded_pass():
    comps = sd_components()
    torch.manual_seed(0)
    # One stride-2 step in the conditioning embedding: the tiny VAE downsamples by 2, not 8.
    controlnet = ControlNetModel.from_unet(comps["unet"], conditioning_embedding_out_channels=(16, 32)).eval()
    with torch.no_grad():  # from_unet zero-initializes the output convs: give the residuals some content
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(std=0.1)
    comps["controlnet"] = controlnet
    pipe = StableDiffusionControlNetPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    pe, ne = prompt_embeds(1)
    call = dict(
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        image=(_image() + 1) / 2,
        height=64,
        width=48,
        num_inference_steps=2,
        output_type="latent",
    )
    main, degraded = first_step_calls_with_sag(pipe, call)
    assert main["sample"].shape[0] == 2 and degraded["sample"].shape[0] == 1
    # The guide branch (unconditional) gets its own rows of every residual the ControlNet computed.
    residuals = main["kwargs"]["down_block_additional_residuals"]
    assert len(degraded["kwargs"]["down_block_additional_residuals"]) == len(residuals) > 0
    for full, part in zip(residuals, degraded["kwargs"]["down_block_additional_residuals"]):
        assert full.shape[0] == 2 and torch.equal(part, full[:1])
    mid = main["kwargs"]["mid_block_additional_residual"]
    assert not torch.equal(mid[0], mid[1])  # the prompts differ per row, so taking the wrong row would show
    assert torch.equal(degraded["kwargs"]["mid_block_additional_residual"], mid[:1])
