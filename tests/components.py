"""Tiny random diffusers components built from configs (no hub access)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

CROSS_DIM = 32
TOKENS = 8


def tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    config = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=[2, 4],  # a list: diffusers SAG reads heads from its last entry
        norm_num_groups=8,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
    ).eval()


def scheduler_config(prediction_type: str = "epsilon") -> dict:
    # steps_offset=1, clip_sample=False: constructing a StableDiffusionPipeline rewrites a shared
    # scheduler's config to these, so every pipeline compared must start from the same schedule.
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        steps_offset=1,
        clip_sample=False,
    )


def sd_components(prediction_type: str = "epsilon", scheduler_cls=DDIMScheduler, seed: int = 0) -> dict:
    return dict(
        vae=tiny_vae(seed),
        text_encoder=None,
        tokenizer=None,
        unet=tiny_unet(seed),
        scheduler=scheduler_cls.from_config(scheduler_config(prediction_type)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sd_pipeline(**kwargs) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(**sd_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeds(n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, TOKENS, CROSS_DIM, generator=g), torch.randn(n, TOKENS, CROSS_DIM, generator=g)
