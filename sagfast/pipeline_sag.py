"""A drop-in for diffusers' `StableDiffusionSAGPipeline`, on the same lifecycle as `sagfast.enable`.

Same components, constructor and `__call__` arguments (defaults: 50 steps, guidance 7.5, sag_scale
0.75). Like diffusers' class, the constructor only registers the components: it does not rewrite the
scheduler's config (StableDiffusionPipeline's constructor sets a DDIM scheduler's `steps_offset` and
`clip_sample`, in place) or the UNet's. Differences, by design: every diffusers scheduler works
(diffusers' class rejects sigma-based ones), the attention map is never materialized, and the
degraded pass gets `cross_attention_kwargs` too.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from sagfast.api import GuidedPipelineMixin, config_of, denoiser_property, guided_call, make_config
from sagfast.config import SAGConfig


class StableDiffusionSAGPipeline(GuidedPipelineMixin, StableDiffusionPipeline):
    unet = denoiser_property("unet")

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessor,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        requires_safety_checker: bool = True,
    ):
        # The type hints are diffusers' own: `from_pipe` hands over a component only when they match.
        DiffusionPipeline.__init__(self)
        # What StableDiffusionPipeline.__init__ sets besides the components, which its __call__ reads
        # (the default height and width). tests/test_defaults.py checks that none is missing.
        self._is_unet_config_sample_size_int = unet is not None and isinstance(unet.config.sample_size, int)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.register_to_config(requires_safety_checker=requires_safety_checker)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        sag_scale: float = 0.75,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        callback_steps: int | None = 1,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        *,
        sag_config: SAGConfig | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        """diffusers' `StableDiffusionSAGPipeline.__call__`; `sag_config` sets the other SAG fields
        (its `scale` is replaced by `sag_scale`). `callback_on_step_end` and its tensor inputs are
        StableDiffusionPipeline's (diffusers' SAG pipeline has only the legacy `callback`)."""
        extra = {"callback": callback, "callback_steps": callback_steps} if callback is not None else {}
        if callback_on_step_end is not None:
            extra["callback_on_step_end"] = callback_on_step_end
        if callback_on_step_end_tensor_inputs is not None:
            extra["callback_on_step_end_tensor_inputs"] = callback_on_step_end_tensor_inputs
        config = make_config(sag_config or config_of(self), {"scale": sag_scale})
        with guided_call(self, config, {"generator": generator, "guidance_scale": guidance_scale}):
            return StableDiffusionPipeline.__call__(
                self,
                prompt=prompt,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                negative_prompt=negative_prompt,
                num_images_per_prompt=num_images_per_prompt,
                eta=eta,
                generator=generator,
                latents=latents,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                ip_adapter_image=ip_adapter_image,
                ip_adapter_image_embeds=ip_adapter_image_embeds,
                output_type=output_type,
                return_dict=return_dict,
                cross_attention_kwargs=cross_attention_kwargs,
                clip_skip=clip_skip,
                **extra,
            )
