"""Tiny random diffusers components built from configs (no hub access)."""

from __future__ import annotations

import os
import sys

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from offline_pipeline import HIDDEN, tiny_unet, tiny_vae  # noqa: E402  (the same tiny UNet and VAE)

__all__ = ["tiny_unet", "tiny_vae"]

CROSS_DIM = HIDDEN
TOKENS = 8


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
