"""A drop-in for diffusers' `StableDiffusionSAGPipeline`, built on `sagfast.enable`.

Same components and the same `__call__` arguments (defaults: 50 steps, guidance 7.5, sag_scale 0.75).
Differences, by design: every diffusers scheduler works (diffusers' class rejects sigma-based ones),
the attention map is never materialized, and the degraded pass gets `cross_attention_kwargs` too.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import StableDiffusionPipeline

from sagfast.api import _base_unet, _checked_unet, _make_config, _set_unet
from sagfast.config import SAGConfig
from sagfast.denoiser import GuidedUNet


class StableDiffusionSAGPipeline(StableDiffusionPipeline):
    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """As diffusers' `from_pipe`; a source pipeline with sagfast enabled hands over its plain UNet."""
        kwargs.setdefault("unet", _base_unet(pipeline))
        return super().from_pipe(pipeline, **kwargs)

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
    ):
        """diffusers' `StableDiffusionSAGPipeline.__call__`; `sag_config` sets the other SAG fields
        (its `scale` is replaced by `sag_scale`)."""
        legacy = {"callback": callback, "callback_steps": callback_steps} if callback is not None else {}
        before = self.unet
        self._install_denoiser(_make_config(sag_config, {"scale": sag_scale}))
        try:
            return super().__call__(
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
                **legacy,
            )
        finally:
            _set_unet(self, before)

    def __getstate__(self):
        # The kept guided UNet points back at this pipeline (weakly): a copy or a pickle makes its own.
        state = self.__dict__.copy()
        state.pop("_sagfast_denoiser", None)
        return state

    def _install_denoiser(self, config: SAGConfig) -> None:
        """Put the guided UNet for `config` in place of `self.unet` for one call. It is kept between calls
        (CUDA graphs captured by one call replay in the next) and made anew when the config or the
        UNet changes; the pipeline is checked either way (a scheduler may have been swapped in)."""
        unet = _checked_unet(self, config)
        kept = self.__dict__.get("_sagfast_denoiser")
        if kept is None or kept.sag_config != config or kept.unet is not unet or kept._pipe() is not self:
            kept = self.__dict__["_sagfast_denoiser"] = GuidedUNet(unet, self, config)
        _set_unet(self, kept)
