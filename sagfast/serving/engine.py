"""The served models and the batching rule: which requests share a guided pipeline call, and that call.

A group is the requests that share the model, steps, size and SAG mode (the model's scheduler is its
own). Their guidance settings may all differ: the call passes sagfast each per-image setting
(`sagfast.config.PER_IMAGE`: the CFG scale and every term's) per image and one generator per
image, so each image is what the same request gives alone (sagfast's per-image settings: every
term's rows run for every image when any image uses the term, an image with scale 0 gets an exact 0
of it). Exact and batched mode requests are in separate calls (they are different step plans).

No request's values reach another's pixels: the per-image arithmetic is sagfast's, and the
pipeline's own CFG line gets a fixed scale (`CALL_CFG_SCALE`), never one taken from the requests: it
combines two equal halves (sagfast hands it each image's guided prediction for both), so any finite
scale gives every image its own prediction unchanged, and no request's scale can overflow it. A
model whose guidance scale is an input of the model (Flux's embedded guidance) groups requests by it.
"""

from __future__ import annotations

import base64
import dataclasses
import io

import numpy as np
import torch

import sagfast
from sagfast.config import PER_IMAGE, TERMS
from sagfast.serving.schema import request_name
from sagfast.terms.cfg import CFGRule

DIGIT_MODELS = ("digits-unet", "digits-dit")
DIGIT_SIZE = 32
CFG_SCALE = CFGRule.scale_field
CALL_CFG_SCALE = 2.0
"""The pipeline call's `guidance_scale` when some image of the call uses CFG (> 1: the pipeline batches
[uncond, cond]; its CFG line then combines two equal halves, see above)."""


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
    refusals: dict = dataclasses.field(default_factory=dict)
    """{per-image setting: why this model cannot run it} (the engine's own error, found at load)."""
    embedded_guidance: bool = False
    """Whether the guidance scale is an input of the model (Flux): then it is not per image."""

    def describe(self) -> dict:
        return {
            "id": self.name,
            "kind": self.kind,
            "size": self.size,
            "source": self.source,
            "scheduler": type(self.pipe.scheduler).__name__,
            "refuses": sorted(request_name(setting) for setting in self.refusals),
        }

    def default_size(self, max_size: int) -> int:
        """A request's size when it names none: the model's own, at most the server's `max_size`."""
        return self.size if self.kind == "digits" else min(self.size, max_size // 8 * 8)


def load_digits(name: str, device: str = "cpu") -> ServedModel:
    """One of the embedded digit models: no download."""
    from sagfast.digits import load_dit_pipeline, load_pipeline

    pipe = load_pipeline(progress=False) if name == "digits-unet" else load_dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    layers = middle_layer(pipe)
    return ServedModel(name, pipe.to(device), "digits", DIGIT_SIZE, "embedded", layers, refusals(pipe, layers))


def term_settings(layers: str) -> dict:
    """The per-call settings that go with the per-image ones: every term that changes attention layers
    (PAG, SEG) changes the capture layer; the others keep their defaults ("mid")."""
    return {term.layers_field: (layers,) for term in TERMS if term.layers_field and term.layers_kind == "attention"}


def refusals(pipe, layers: str) -> dict:
    """{setting: the engine's reason} for each per-image term this pipeline cannot run, found by
    enabling it (the engine checks the model at `enable`), so that a request asking for it is refused
    alone (422) instead of failing the call it would share."""
    out = {}
    for setting in PER_IMAGE:
        if setting == CFG_SCALE:
            continue
        try:
            sagfast.enable(pipe, **{"scale": 0.0, setting: 1.0}, **term_settings(layers))
        except ValueError as exc:
            out[setting] = str(exc)
        else:
            sagfast.disable(pipe)
    return out


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
    size = int(sample) * int(getattr(pipe, "vae_scale_factor", 8))
    embedded = bool(getattr(denoiser.config, "guidance_embeds", False))
    return ServedModel(name, pipe, "text", size, source, layers, refusals(pipe, layers), embedded)


def load_models(specs: dict, device: str = "cpu") -> dict:
    """{name: ServedModel} for {name: source}, source "embedded" for the digit models."""
    models = {}
    for name, source in specs.items():
        if source == "embedded":
            if name not in DIGIT_MODELS:
                raise ValueError(f"{name!r} is not an embedded model; embedded: {', '.join(DIGIT_MODELS)}")
            models[name] = load_digits(name, device)
            continue
        try:
            models[name] = load_diffusers(name, source, device)
        except Exception as exc:  # the operator's error names the model and its source, on one line
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise RuntimeError(f"--model {name}={source} did not load: {reason}") from exc
    return models


def subject_problem(model: ServedModel, request) -> tuple[str, str] | None:
    """(field, message) when the request does not fit its model, else None."""
    size = request.size or model.size
    asked = request.settings()
    for setting, why in model.refusals.items():
        if asked[setting] > 0:
            return request_name(setting), f"{model.name} cannot run it: {why}"
    if model.kind == "digits":
        if request.label is None:
            return "label", f"{model.name} draws digits: give `label` (0..9), not `prompt`"
        if size != model.size:
            return "size", f"{model.name} makes {model.size}x{model.size} images; got size {size}"
    elif request.prompt is None:
        return "prompt", f"{model.name} is a text-to-image model: give `prompt`, not `label`"
    return None


def group_key(request, group_by: str = "shape", model: ServedModel | None = None) -> tuple:
    """Requests with equal keys share one pipeline call (their `size` resolved)."""
    key = (request.model, request.steps, request.size, request.mode)
    if model is not None and model.embedded_guidance:
        key += (request.guidance_scale,)  # an input of the model, one per call
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
    settings = {setting: per_image([s[setting] for s in each]) for setting in PER_IMAGE}
    if model.embedded_guidance:
        guidance = settings.pop(CFG_SCALE)  # the group's one value (group_key)
    else:
        uses_cfg = any(s[CFG_SCALE] > 1 for s in each)
        guidance = CALL_CFG_SCALE if uses_cfg else 1.0
    device = getattr(pipe, "_execution_device", torch.device("cpu"))
    generators = [torch.Generator(device=device).manual_seed(r.seed) for r in requests]
    call = dict(num_inference_steps=requests[0].steps, guidance_scale=guidance, generator=generators, output_type="np")
    if model.kind == "digits":
        call["class_labels"] = [r.label for r in requests]
    else:
        call.update(prompt=[r.prompt for r in requests], height=requests[0].size or model.size, width=requests[0].size or model.size)
    with sagfast.guided(pipe, mode=requests[0].mode, **term_settings(model.layers), **settings):
        out = pipe(**call).images
    # nan_to_num: a non-finite pixel (a scale past what the schema lets through) is black, not undefined.
    return [(np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32)), 0.0, 1.0) * 255.0).round().astype(np.uint8) for image in out]


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
