"""A diffusers-style pipeline for the embedded class-conditional digit model.

Structured like diffusers' Stable Diffusion pipeline, so `sagfast.enable(pipe)` treats it the same way:
registered `unet` / `scheduler` components, a `do_classifier_free_guidance` property, and one UNet call
per step on `scheduler.scale_model_input(...)` of the `[uncond, cond]` batch under CFG, with the class
embedding (a registered component) supplying `encoder_hidden_states`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from sagfast.digits.models import NUM_CLASSES, ClassEmbedding

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def initial_latents(shape: tuple, latents, generator, device, dtype) -> torch.Tensor:
    """The initial noise of a digit pipeline: `latents` checked against `shape`, else drawn."""
    if latents is None:
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}; got {tuple(latents.shape)}")
    return latents.to(device=device, dtype=dtype)


@dataclass
class DigitPipelineOutput(BaseOutput):
    """`images`: a list of PIL "L" images, a [B, 32, 32, 1] numpy array or a [B, 1, 32, 32] tensor in
    [0, 1], or the raw [-1, 1] samples for output_type="latent"."""

    images: list | np.ndarray | torch.Tensor


class DigitDiffusionPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "class_embedding->unet"

    def __init__(self, unet, class_embedding: ClassEmbedding, scheduler):
        super().__init__()
        self.register_modules(unet=unet, class_embedding=class_embedding, scheduler=scheduler)
        self._guidance_scale = 1.0

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def sample_size(self) -> int:
        return int(self.unet.config.sample_size)

    def _labels(self, class_labels, device) -> torch.Tensor:
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0:
            raise ValueError("class_labels is empty")
        if labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise ValueError(f"class_labels must be digits 0..{NUM_CLASSES - 1}; got {labels.tolist()}")
        return labels.to(device)

    def _step_kwargs(self, generator, eta: float) -> dict:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        eta: float = 0.0,
        callback_on_step_end: Callable | None = None,
    ):
        """Generate one 32x32 digit per entry of `class_labels`.

        guidance_scale: classifier-free guidance weight g (`uncond + g * (cond - uncond)`); <= 1 turns CFG
        off (one conditional batch per step). latents: the initial noise [B, 1, 32, 32] (before
        `init_noise_sigma` scaling), else drawn from `generator`. callback_on_step_end(pipe, i, t,
        {"latents": ...}) may return a dict with new "latents"."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1; got {num_inference_steps}")
        device = self._execution_device
        dtype = self.unet.dtype
        labels = self._labels(class_labels, device)
        batch = labels.shape[0]
        self._guidance_scale = float(guidance_scale)

        cond = self.class_embedding(labels).to(dtype)
        if self.do_classifier_free_guidance:
            null = torch.full_like(labels, self.class_embedding.null_class)
            embeds = torch.cat([self.class_embedding(null).to(dtype), cond])
        else:
            embeds = cond

        size = self.sample_size
        shape = (batch, self.unet.config.in_channels, size, size)
        latents = initial_latents(shape, latents, generator, device, dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta)

        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
            if self.do_classifier_free_guidance:
                uncond, cond_pred = noise_pred.chunk(2)
                noise_pred = uncond + self._guidance_scale * (cond_pred - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            if callback_on_step_end is not None:
                out = callback_on_step_end(self, i, t, {"latents": latents})
                if out and "latents" in out:
                    latents = out["latents"]

        self.maybe_free_model_hooks()
        if output_type == "latent":
            images = latents
        else:
            images = (latents.float() / 2 + 0.5).clamp(0, 1)
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
            elif output_type == "pil":
                arr = (images[:, 0].cpu().numpy() * 255).round().astype(np.uint8)
                images = [PIL.Image.fromarray(a, mode="L") for a in arr]
        if not return_dict:
            return (images,)
        return DigitPipelineOutput(images=images)
