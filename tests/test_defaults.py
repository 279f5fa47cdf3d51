"""What a user calls first: pipelines called with only a prompt (every default the pipeline reads),
and the signatures of the classes sagfast defines or substitutes.

The drop-in `sagfast.StableDiffusionSAGPipeline` is compared with diffusers' own
`StableDiffusionSAGPipeline` built from the same tiny components, with a real CLIP tokenizer and text
encoder (examples/offline_pipeline.py), so that prompts are encoded as a user's are.
"""

import inspect
import os
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
    StableDiffusionSAGPipeline as DiffusersSAG,
)

import sagfast
from sagfast.api import guided_class

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from offline_pipeline import tiny_components, tiny_stable_diffusion  # noqa: E402

PROMPT = "a photo of a cat"


def tolerance(ref):
    return 1e-4 * max(1.0, ref.abs().max().item())


def pair():
    """diffusers' SAG pipeline and sagfast's drop-in on the same components (no image encoder: the
    IP-Adapter-free pipeline, as `from_pretrained` of SD 1.5 gives it)."""
    comps = tiny_components()
    theirs, ours = DiffusersSAG(**comps), sagfast.StableDiffusionSAGPipeline(**comps)
    for pipe in (theirs, ours):
        pipe.set_progress_bar_config(disable=True)
    return theirs, ours


def seeded(**call):
    return dict(call, generator=torch.Generator().manual_seed(0), output_type="latent")


def test_the_dropin_sets_every_attribute_stable_diffusion_sets():
    comps = tiny_components()
    missing = set(vars(StableDiffusionPipeline(**comps))) - set(vars(sagfast.StableDiffusionSAGPipeline(**comps)))
    assert not missing


def test_the_dropin_with_only_a_prompt_matches_diffusers():
    theirs, ours = pair()
    ref = theirs(PROMPT, **seeded()).images
    out = ours(PROMPT, **seeded()).images
    # 50 steps, 7.5, sag 0.75 and the UNet's sample_size x the VAE's factor: a 16 x 16 latent.
    assert out.shape == ref.shape == (1, 4, 16, 16)
    assert (out - ref).abs().max().item() <= tolerance(ref)
    plain = StableDiffusionPipeline(**tiny_components())
    plain.set_progress_bar_config(disable=True)
    assert (ref - plain(PROMPT, **seeded()).images).abs().max().item() > 100 * tolerance(ref)


def test_the_dropin_from_pipe_as_the_readme_shows_it():
    pipe = sagfast.StableDiffusionSAGPipeline.from_pipe(tiny_stable_diffusion())
    image = pipe(PROMPT, sag_scale=0.75).images[0]
    assert image.size == (32, 32)


def test_the_dropin_with_only_prompt_embeds_and_several_images_per_prompt():
    theirs, ours = pair()
    embeds, _ = theirs.encode_prompt([PROMPT, "a dog"], "cpu", 1, False)
    for call in (dict(prompt_embeds=embeds), dict(prompt=[PROMPT, "a dog"], num_images_per_prompt=2)):
        ref = theirs(**seeded(**call, num_inference_steps=4)).images
        out = ours(**seeded(**call, num_inference_steps=4)).images
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= tolerance(ref), call.keys()


def test_the_dropin_step_end_callback_sees_what_diffusers_legacy_callback_sees():
    theirs, ours = pair()
    seen_theirs, seen_ours = [], []
    theirs(PROMPT, **seeded(num_inference_steps=4), callback=lambda i, t, latents: seen_theirs.append(latents.clone()))

    def on_step_end(pipe, i, t, kwargs):
        seen_ours.append(kwargs["latents"].clone())
        return {}

    ours(PROMPT, **seeded(num_inference_steps=4), callback_on_step_end=on_step_end)
    # PNDM runs 5 evaluations for 4 steps (PLMS repeats one timestep); diffusers' legacy callback skips
    # that warm-up evaluation, the step-end callback is called after every one.
    assert len(seen_ours) == len(seen_theirs) + 1 == 5
    for a, b in zip(seen_ours[1:], seen_theirs):
        assert (a - b).abs().max().item() <= tolerance(b)


def test_an_enabled_pipeline_with_only_a_prompt_is_diffusers_sag():
    theirs, _ = pair()
    pipe = sagfast.enable(tiny_stable_diffusion(), scale=0.75)
    ref = theirs(PROMPT, **seeded()).images
    assert (pipe(PROMPT, **seeded()).images - ref).abs().max().item() <= tolerance(ref)


def family_pipelines():
    """(name, tiny pipeline, the fewest arguments its call needs) for every family sagfast guides."""
    from diffusers import DDPMPipeline
    from test_families import dit, pixart, unconditional
    from test_families_flow import embeds, flux, sd3
    from test_pipelines import sdxl_pipeline
    from test_video import cogvideox, hunyuan, hunyuan_call, ltx, wan, wan_i2v, wan_i2v_call

    from sagfast.digits import load_dit_pipeline, load_pipeline

    pe, pooled = embeds(n=1)
    xl = torch.Generator().manual_seed(3)
    t5, ones = torch.randn(1, 5, 24, generator=xl), torch.ones(1, 5, dtype=torch.long)
    video_text = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(4))  # CogVideoX's 8 tokens of 16
    return [
        ("sd", tiny_stable_diffusion, dict(prompt=PROMPT)),
        (
            "sdxl",
            sdxl_pipeline,
            dict(prompt_embeds=torch.randn(1, 8, 64, generator=xl), pooled_prompt_embeds=torch.randn(1, 32, generator=xl)),
        ),
        ("ddpm", lambda: unconditional(DDPMPipeline), dict(num_inference_steps=3)),
        ("dit", dit, dict(class_labels=[1])),
        (
            "pixart",
            pixart,
            dict(
                prompt_embeds=t5,
                prompt_attention_mask=ones,
                negative_prompt=None,
                negative_prompt_embeds=-t5,
                negative_prompt_attention_mask=ones,
                use_resolution_binning=False,
            ),
        ),
        (
            "sd3",
            sd3,
            dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt_embeds=-pe, negative_pooled_prompt_embeds=-pooled),
        ),
        ("flux", flux, dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, height=32, width=32)),
        # The video pipelines' default sizes (CogVideoX 49 frames of 480x720, LTX 161 of 512x704, Wan 81 of 480x832,
        # HunyuanVideo 129 of 720x1280) are too slow here.
        (
            "cogvideox",
            cogvideox,
            dict(prompt_embeds=video_text, negative_prompt_embeds=-video_text, height=64, width=80, num_frames=9),
        ),
        (
            "ltx",
            ltx,
            dict(
                prompt_embeds=video_text,
                prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
                negative_prompt_embeds=-video_text,
                negative_prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
                height=32,
                width=64,
                num_frames=9,
            ),
        ),
        (
            "wan",
            wan,
            dict(prompt_embeds=video_text, negative_prompt_embeds=-video_text, height=64, width=80, num_frames=9),
        ),
        (
            "wan-i2v",
            wan_i2v,
            {
                k: v
                for k, v in wan_i2v_call().items()
                if k in ("image", "prompt_embeds", "negative_prompt_embeds", "height", "width", "num_frames")
            },
        ),
        (
            "hunyuan",
            hunyuan,
            {
                k: v
                for k, v in hunyuan_call().items()
                if k in ("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask", "height", "width", "num_frames")
            },
        ),
        ("digits", lambda: load_pipeline(progress=False), dict(class_labels=[3])),
        ("digits-dit", load_dit_pipeline, dict(class_labels=[3])),
    ]


FAMILIES = family_pipelines()


@pytest.mark.parametrize("name, build, call", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_an_enabled_pipeline_keeps_its_call_signature_name_and_docstring(name, build, call):
    pipe = build()
    base = type(pipe)
    sagfast.enable(pipe)
    assert type(pipe) is guided_class(base) and type(pipe) is not base
    assert inspect.signature(pipe.__call__) == inspect.signature(base.__call__.__get__(pipe))
    assert inspect.signature(type(pipe).__call__) == inspect.signature(base.__call__)
    assert type(pipe).__call__.__name__ == "__call__"
    assert type(pipe).__call__.__doc__ == base.__call__.__doc__
    assert "*args" not in str(inspect.signature(pipe.__call__))


@pytest.mark.parametrize("name, build, call", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_an_enabled_pipeline_runs_on_its_call_defaults(name, build, call):
    """No height, width or steps (but DDPM's 1000 steps and Flux's 128-latent default size, too slow here): what the pipeline's own call
    reads by default, guided; scale=0 is the plain call, SAG changes it."""
    pipe = build()
    steps = {} if "num_inference_steps" in call or name in ("sd", "digits", "digits-dit") else {"num_inference_steps": 3}
    output_type = "pt" if name.startswith("digits") else "latent"

    def run():
        return pipe(**call, **steps, generator=torch.Generator().manual_seed(0), output_type=output_type)

    def get(out):
        images = out.frames if hasattr(out, "frames") else out.images  # a video pipeline's output
        return images if torch.is_tensor(images) else torch.as_tensor(images)

    plain = get(run())
    with sagfast.guided(pipe, scale=0):
        assert torch.equal(get(run()), plain)
    with sagfast.guided(pipe, scale=0.75):
        guided = get(run())
    assert guided.shape == plain.shape and torch.isfinite(guided).all()
    assert (guided - plain).abs().max() > 1e-4
