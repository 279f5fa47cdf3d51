"""A diffusers-style pipeline for the embedded class-conditional digit transformer (flow matching).

Structured like diffusers' DiT / PixArt / Stable Diffusion pipelines: registered `transformer` /
`scheduler` components, `guidance_scale` and `do_classifier_free_guidance` properties, and one
transformer call per step on the `[uncond, cond]` batch under CFG (the null class 10 first, then the
requested labels), combined as `uncond + g * (cond - uncond)`.

The transformer predicts the flow velocity v = eps - x0 of x_sigma = (1 - sigma) x0 + sigma eps at
timestep sigma * 1000, so `FlowMatchEulerDiscreteScheduler` (or any flow-matching scheduler with the
same timesteps) integrates it from pure noise (sigma = 1) to the image (sigma = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from sagfast.digits.models import NULL_CLASS, NUM_CLASSES
from sagfast.digits.pipeline import initial_latents

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class DigitDiTPipelineOutput(BaseOutput):
    """`images`: a [B, 1, 32, 32] tensor in [-1, 1] (output_type="pt"), the raw unclamped samples
    (nominally [-1, 1]; "latent"), a [B, 32, 32, 1] numpy array in [0, 1] ("np") or a list of PIL "L"
    images ("pil")."""

    images: list | np.ndarray | torch.Tensor


class DigitDiTPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self._guidance_scale = 1.0

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def sample_size(self) -> int:
        return int(self.transformer.config.sample_size)

    @property
    def null_class(self) -> int:
        """The label of the unconditional branch (`num_embeds_ada_norm`, i.e. 10)."""
        return int(self.transformer.config.num_embeds_ada_norm)

    def _labels(self, class_labels, device, allow_null: bool) -> torch.Tensor:
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0:
            raise ValueError("class_labels is empty")
        top = self.null_class if allow_null else NUM_CLASSES - 1
        if labels.min() < 0 or labels.max() > top:
            raise ValueError(
                f"class_labels must be digits 0..{NUM_CLASSES - 1} (or {NULL_CLASS}, the null class, for "
                f"unconditional samples); got {labels.tolist()}"
            )
        return labels.to(device)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
    ):
        """Generate one 32x32 digit per entry of `class_labels`.

        class_labels: digits 0..9, or 10 (the null class) for unconditional samples.
        guidance_scale: classifier-free guidance weight g (`uncond + g * (cond - uncond)`); <= 1 turns CFG
        off (one batch of B per step). latents: the initial noise [B, 1, 32, 32], else drawn from
        `generator`. output_type: "pt" (tensor in [-1, 1]), "latent" (the raw samples, unclamped),
        "np" ([B, 32, 32, 1] in [0, 1]) or "pil" (a list of "L" images). callback_on_step_end(pipe, i, t,
        {"latents": ...}) may return a dict with new "latents"."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1; got {num_inference_steps}")
        device = self._execution_device
        dtype = self.transformer.dtype
        labels = self._labels(class_labels, device, allow_null=True)
        batch = labels.shape[0]
        self._guidance_scale = float(guidance_scale)

        if self.do_classifier_free_guidance:
            labels_in = torch.cat([torch.full_like(labels, self.null_class), labels])
        else:
            labels_in = labels

        size = self.sample_size
        shape = (batch, self.transformer.config.in_channels, size, size)
        latents = initial_latents(shape, latents, generator, device, dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        for i, t in enumerate(self.progress_bar(timesteps)):
            x_in = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
            t_batch = t.expand(x_in.shape[0]).to(device)
            v = self.transformer(hidden_states=x_in, timestep=t_batch, class_labels=labels_in, return_dict=False)[0]
            if self.do_classifier_free_guidance:
                u, c = v.chunk(2)
                v = u + self._guidance_scale * (c - u)
            latents = self.scheduler.step(v, t, latents).prev_sample
            if callback_on_step_end is not None:
                out = callback_on_step_end(self, i, t, {"latents": latents})
                if out and "latents" in out:
                    latents = out["latents"]

        self.maybe_free_model_hooks()
        if output_type == "latent":
            images = latents
        elif output_type == "pt":
            images = latents.float().clamp(-1, 1)
        else:
            images = (latents.float() / 2 + 0.5).clamp(0, 1)
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
            else:
                arr = (images[:, 0].cpu().numpy() * 255).round().astype(np.uint8)
                images = [PIL.Image.fromarray(a, mode="L") for a in arr]
        if not return_dict:
            return (images,)
        return DigitDiTPipelineOutput(images=images)
