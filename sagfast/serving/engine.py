"""The served models and the batching rule: which requests share a guided pipeline call, and that call.

A group is the requests that share the model, steps, size and SAG mode (the model's scheduler is its
own). Their guidance settings may all differ: the call passes sagfast one `cfg_scale`, `scale`,
`pag_scale` and `seg_scale` per image and one generator per image, so each image is what the same
request gives alone (sagfast's per-image settings: every term's rows run for every image when any
image uses the term, an image with scale 0 gets an exact 0 of it). Exact and batched mode requests
are in separate calls (they are different step plans).
"""

from __future__ import annotations

import base64
import dataclasses
import io

import numpy as np
import torch

import sagfast

DIGIT_MODELS = ("digits-unet", "digits-dit")
SETTINGS = ("cfg_scale", "scale", "pag_scale", "seg_scale")


@dataclasses.dataclass
class ServedModel:
    """A pipeline the server guides, and what its requests may ask."""

    name: str
    pipe: object
    kind: str
    """"digits" (label-conditioned, fixed size) or "text" (a diffusers text-to-image pipeline)."""
    size: int
    """Its native image side in pixels (a request's default size)."""
    source: str
    layers: str = "mid"
    """The layer PAG and SEG change: the one SAG captures ("mid" resolved by the model's family)."""

    def describe(self) -> dict:
        return {
            "id": self.name,
            "kind": self.kind,
            "size": self.size,
            "source": self.source,
            "scheduler": type(self.pipe.scheduler).__name__,
        }


def load_digits(name: str, device: str = "cpu") -> ServedModel:
    """One of the embedded digit models: no download."""
    from sagfast.digits import load_dit_pipeline, load_pipeline

    pipe = load_pipeline(progress=False) if name == "digits-unet" else load_dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return ServedModel(name, pipe.to(device), "digits", 32, "embedded", middle_layer(pipe))


def middle_layer(pipe) -> str:
    from sagfast.families import family_of

    family = family_of(pipe)
    return family.resolve_layer(getattr(pipe, family.attribute), "mid")[0]


def load_diffusers(name: str, source: str, device: str = "cpu") -> ServedModel:
    """A diffusers text-to-image pipeline (a local folder or a hub repo id) that sagfast guides."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(source)
    layers = middle_layer(pipe)  # and a clear error now for a pipeline sagfast does not guide
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    sample = denoiser.config.sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return ServedModel(name, pipe, "text", int(sample) * int(getattr(pipe, "vae_scale_factor", 8)), source, layers)


def load_models(specs: dict, device: str = "cpu") -> dict:
    """{name: ServedModel} for {name: source}, source "embedded" for the digit models."""
    models = {}
    for name, source in specs.items():
        if source == "embedded":
            if name not in DIGIT_MODELS:
                raise ValueError(f"{name!r} is not an embedded model; embedded: {', '.join(DIGIT_MODELS)}")
            models[name] = load_digits(name, device)
        else:
            models[name] = load_diffusers(name, source, device)
    return models


def subject_problem(model: ServedModel, request) -> tuple[str, str] | None:
    """(field, message) when the request does not fit its model, else None."""
    size = request.size or model.size
    if model.kind == "digits":
        if request.label is None:
            return "label", f"{model.name} draws digits: give `label` (0..9), not `prompt`"
        if size != model.size:
            return "size", f"{model.name} makes {model.size}x{model.size} images; got size {size}"
    elif request.prompt is None:
        return "prompt", f"{model.name} is a text-to-image model: give `prompt`, not `label`"
    return None


def group_key(request, group_by: str = "shape") -> tuple:
    """Requests with equal keys share one pipeline call."""
    key = (request.model, request.steps, request.size, request.mode)
    if group_by == "settings":
        key += tuple(sorted(request.settings().items()))
    return key


def per_image(values: list):
    """One value for all images where they agree (the engine then runs a term's rows only if it is
    on), else the list."""
    return values[0] if all(v == values[0] for v in values) else list(values)


def run_group(model: ServedModel, requests: list) -> list[np.ndarray]:
    """One guided pipeline call for `requests` (one group): each image as uint8 [H, W, C]."""
    pipe = model.pipe
    each = [r.settings() for r in requests]
    settings = {field: per_image([s[field] for s in each]) for field in SETTINGS}
    cfg = settings["cfg_scale"]
    uses_cfg = max(cfg) > 1 if isinstance(cfg, list) else cfg > 1
    # With cfg_scale per image sagfast hands the pipeline's CFG line each image's own prediction, so any
    # call scale > 1 gives them; the call needs one when some image uses CFG (its [uncond, cond] batch).
    guidance = max(cfg) if isinstance(cfg, list) else cfg
    device = getattr(pipe, "_execution_device", torch.device("cpu"))
    generators = [torch.Generator(device=device).manual_seed(r.seed) for r in requests]
    steps = requests[0].steps
    layers = (model.layers,)
    with sagfast.guided(pipe, mode=requests[0].mode, pag_layers=layers, seg_layers=layers, **settings):
        if model.kind == "digits":
            out = pipe(
                class_labels=[r.label for r in requests],
                num_inference_steps=steps,
                guidance_scale=guidance if uses_cfg else 1.0,
                generator=generators,
                output_type="np",
            ).images
        else:
            size = requests[0].size or model.size
            out = pipe(
                prompt=[r.prompt for r in requests],
                num_inference_steps=steps,
                guidance_scale=guidance if uses_cfg else 1.0,
                generator=generators,
                height=size,
                width=size,
                output_type="np",
            ).images
    return [(np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8) for image in out]


def png_base64(image: np.ndarray) -> str:
    from PIL import Image

    array = image[..., 0] if image.shape[-1] == 1 else image
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(text: str) -> np.ndarray:
    """A response's image as uint8 [H, W] or [H, W, C] (for clients and tests)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


__all__ = ["DIGIT_MODELS", "ServedModel", "decode_png", "group_key", "load_models", "png_base64", "run_group", "subject_problem"]
