"""The guided denoiser matches diffusers' StableDiffusionSAGPipeline with each ops backend.

Same setup as test_parity.py (tiny random components, fp32, a non-square 64x48 image: 16x12 mid map),
a couple of cases per backend. An explicitly requested backend never falls back, so a passing case
ran that backend's attention_mass, degrade and combine.
"""

import functools

import pytest
import torch
from components import prompt_embeds, sd_components
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
    StableDiffusionSAGPipeline as DiffusersSAG,
)

import sagfast
from sagfast import ops
from sagfast.ops import _cpp, _triton

CALL = dict(num_images_per_prompt=2, height=64, width=48, num_inference_steps=3, output_type="latent")
# The tiny pipelines run on CPU tensors (also on a GPU machine, where Triton then cannot take them).
_CPU = torch.empty(0)
WHY_NOT = {
    "triton": _triton.available() or _triton.device_reasons(_CPU),
    "cpp": _cpp.available() or _cpp.device_reasons(_CPU),
}
BACKENDS = ["torch"] + [pytest.param(n, marks=pytest.mark.skipif(bool(w), reason="; ".join(w))) for n, w in WHY_NOT.items()]
CASES = [
    (DDIMScheduler, "epsilon", 7.5),
    (DPMSolverMultistepScheduler, "v_prediction", 1.0),
]


@functools.lru_cache(maxsize=None)
def reference(scheduler_cls, prediction_type, guidance_scale):
    """(diffusers' SAG result, the unguided result) of a case: computed once, shared by the backends."""
    comps = sd_components(prediction_type, scheduler_cls)
    ref = run(DiffusersSAG(**comps), guidance_scale, sag_scale=0.75)
    plain = run(StableDiffusionPipeline(**comps), guidance_scale)
    return ref, plain


def run(pipe, guidance_scale, **extra):
    pe, ne = prompt_embeds()
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=guidance_scale, generator=gen, **CALL, **extra).images


@pytest.mark.parametrize("scheduler_cls,prediction_type,guidance_scale", CASES, ids=["ddim-eps-cfg", "dpm-v-nocfg"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_with_diffusers_per_backend(backend, scheduler_cls, prediction_type, guidance_scale, monkeypatch):
    ref, plain = reference(scheduler_cls, prediction_type, guidance_scale)
    comps = sd_components(prediction_type, scheduler_cls)

    used = []
    for name in ("attention_mass", "degrade", "combine"):
        fn = getattr(ops, name)

        def spy(*args, _fn=fn, _name=name, **kwargs):
            used.append((_name, kwargs.get("backend")))
            return _fn(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    monkeypatch.setattr("sagfast.attention.processors.attention_mass", ops.attention_mass)

    pipe = StableDiffusionPipeline(**comps)
    sagfast.enable(pipe, scale=0.75, backend=backend)
    out = run(pipe, guidance_scale)

    tol = 1e-4 * max(1.0, ref.abs().max().item())  # as test_parity.py
    diff = (out - ref).abs().max().item()
    print(f"{backend} {scheduler_cls.__name__} {prediction_type} g={guidance_scale}: {diff:.3g} (tol {tol:.3g})")
    assert diff <= tol
    assert (ref - plain).abs().max().item() > 100 * tol  # SAG really acted
    assert {n for n, _ in used} == {"attention_mass", "degrade", "combine"}
    assert all(b == backend for _, b in used)
