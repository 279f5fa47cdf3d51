"""`cfg_rule="fdg"` against diffusers' FrequencyDecoupledGuidance (kornia's Laplacian pyramid; kornia is in
the test extra, sagfast's pyramid is its own torch code): its forward, its final latents in diffusers'
modular SDXL and SD3 pipelines against `sagfast.enable` on the standard pipelines with the same tiny
components, per-image CFG on/off in one call against each image alone, and the choice that `fdg_scales`
replace the CFG scale. (The tiny SD pipeline's loop parity is a row of tests/test_terms.py's CASES.)

The pipeline cases use 16 x 16 latents: kornia pads any other size (24 x 20 here) to a power of two
per side and diffusers' guider then returns the padded prediction, which the scheduler cannot step
(`test_other_sizes_...` checks sagfast's own padding against kornia's `minimal_padding` pyramid).

Every parity bound is 1e-4 * max(1, max |ref|), and the rule must move the result from plain CFG by
more than 100x the bound, so a parity that holds because FDG changed nothing cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance, FrequencyDecoupledGuidance
from diffusers.guiders.frequency_decoupled_guidance import build_image_from_pyramid
from kornia.geometry.transform import build_laplacian_pyramid
from test_families_flow import sd3
from test_guiders import modular_sd3, sd3_inputs
from test_modular import inputs, modular_sdxl
from test_pipelines import sdxl_pipeline
from test_terms import one_row, sd_inputs

import sagfast
from sagfast.config import SAGConfig
from sagfast.terms.cfg import RULES


def fdg(o_u, o_c, g=5.0, **config):
    base, terms = RULES["fdg"](SAGConfig(cfg_rule="fdg", **config)).combine(o_u, o_c, g, 0)
    assert terms == []  # the whole prediction is the rule's
    return base


def predictions(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    o_u = torch.randn(shape, generator=g)
    return o_u, 0.8 * o_u + 0.5 * torch.randn(shape, generator=g)


@pytest.mark.parametrize(
    "shape, config",
    [
        ((2, 4, 16, 16), dict()),
        ((2, 4, 16, 32), dict(fdg_scales=(10.0, 5.0, 3.0), fdg_parallel_weights=(0.5, 1.0, 0.0))),
        ((1, 4, 32, 32), dict(fdg_scales=(7.0, 2.0), fdg_guidance_rescale=0.7)),
    ],
    ids=["default", "3-levels-weights", "rescale"],
)
def test_the_combine_equals_diffusers_forward(shape, config):
    o_u, o_c = predictions(shape)
    guider = FrequencyDecoupledGuidance(
        guidance_scales=list(config.get("fdg_scales", (10.0, 5.0))),
        parallel_weights=None if "fdg_parallel_weights" not in config else list(config["fdg_parallel_weights"]),
        guidance_rescale=config.get("fdg_guidance_rescale", 0.0),
    )
    want = guider.forward(o_c, o_u).pred
    got = fdg(o_u, o_c, **config)
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    top = guider.guidance_scales[0]
    assert (want - (o_u + top * (o_c - o_u))).abs().max().item() > 100 * bound  # not plain CFG at any one scale


def test_other_sizes_are_padded_to_the_levels_stride_and_cropped():
    # 24 x 20 at 3 levels: kornia's minimal_padding pyramid (reflect to 24 x 20 -> 24 x 20: already multiples
    # of 4) and 26 x 22 -> 28 x 24; diffusers' guider returns kornia's power-of-two padded size instead.
    for h, w in ((24, 20), (26, 22)):
        o_u, o_c = predictions((2, 4, h, w))
        scales = (10.0, 5.0, 2.0)
        with pytest.warns(FutureWarning):  # kornia's power-of-two padding, about to change
            padded = FrequencyDecoupledGuidance(guidance_scales=list(scales)).forward(o_c, o_u).pred
        assert padded.shape[-2:] == (32, 32)
        pyr_c = build_laplacian_pyramid(o_c, 3, minimal_padding=True)
        pyr_u = build_laplacian_pyramid(o_u, 3, minimal_padding=True)
        want = build_image_from_pyramid([u + s * (c - u) for s, c, u in zip(scales, pyr_c, pyr_u)])[:, :, :h, :w]
        got = fdg(o_u, o_c, fdg_scales=scales)
        assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item()), (h, w)


def test_images_without_cfg_get_their_cond_prediction_exactly():
    o_u, o_c = predictions((2, 4, 16, 16), seed=1)
    assert torch.equal(fdg(o_u, o_c, 1.0), o_c)
    mixed = fdg(o_u, o_c, torch.tensor([1.0, 5.0]))
    assert torch.equal(mixed[0], o_c[0])
    alone = FrequencyDecoupledGuidance().forward(o_c[1:], o_u[1:]).pred
    assert (mixed[1:] - alone).abs().max().item() <= 1e-4 * max(1.0, alone.abs().max().item())


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(fdg_scales=()), "fdg_scales must be a non-empty sequence"),
        (dict(fdg_scales=(10.0, float("nan"))), "fdg_scales entries must be finite"),
        (dict(fdg_scales=5.0), "fdg_scales must be a non-empty sequence"),
        (dict(fdg_parallel_weights=(0.5, "a")), "fdg_parallel_weights entries must be a real number"),
        (dict(fdg_guidance_rescale=1.5), "fdg_guidance_rescale must be in"),
    ],
)
def test_bad_settings_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        SAGConfig(cfg_rule="fdg", **config)


def test_weights_of_another_length_and_other_layouts_are_refused():
    with pytest.raises(ValueError, match="fdg_parallel_weights has 3 entries and fdg_scales 2"):
        RULES["fdg"](SAGConfig(cfg_rule="fdg", fdg_parallel_weights=(0.5, 0.5, 0.5)))
    o_u, o_c = predictions((2, 16, 8))
    with pytest.raises(ValueError, match=r"Laplacian pyramid of images \[B, C, H, W\]"):
        fdg(o_u, o_c)


def sdxl_call():
    call = inputs()
    call.update(latents=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6)), height=32, width=32)
    return call


def sd3_call():
    call = sd3_inputs()
    call.update(latents=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6)), height=32, width=32)
    return call


def modular(family, guider):
    pipe = (modular_sdxl if family == "sdxl" else modular_sd3)(guider)
    call = sdxl_call() if family == "sdxl" else sd3_call()
    call["output"] = "latents"
    return pipe(**call)


def standard(family, **config):
    call = sdxl_call() if family == "sdxl" else sd3_call()
    call.pop("output", None)
    pipe = sagfast.enable(sdxl_pipeline() if family == "sdxl" else sd3(), scale=0.0, **config)
    return pipe(**call, guidance_scale=5.0, output_type="latent").images


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_final_latents_equal_diffusers_guider_in_its_modular_pipeline(family):
    scales, weights = (6.0, 3.0), (0.5, 1.0)  # not the defaults: the settings reach the rule
    want = modular(family, FrequencyDecoupledGuidance(guidance_scales=list(scales), parallel_weights=list(weights)))
    plain = modular(family, ClassifierFreeGuidance(guidance_scale=5.0))
    got = standard(family, cfg_rule="fdg", fdg_scales=scales, fdg_parallel_weights=weights)
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    assert (want - plain).abs().max().item() > 100 * bound  # FDG moved the latents


def test_cfg_scale_turns_fdg_on_or_off_per_image_and_its_value_is_not_used():
    # cfg_scale [1, 3, 7.5] in one call: image 0 without CFG, images 1 and 2 FDG with fdg_scales, each as
    # alone; image 1 alone at cfg_scale 7.5 is the same (fdg_scales replace the CFG scale), and is not
    # plain CFG at 3.
    make, call, latents = sd_inputs(3)
    scales = [1.0, 3.0, 7.5]
    pipe = sagfast.enable(make(), scale=0.0, cfg_rule="fdg", cfg_scale=scales)
    steps = dict(guidance_scale=7.5, num_inference_steps=3, output_type="latent")  # > 1: the pipeline batches CFG
    mixed = pipe(**call, latents=latents, **steps).images
    for i, g in enumerate(scales):
        sagfast.enable(pipe, scale=0.0, cfg_rule="fdg", cfg_scale=g)
        alone = pipe(**one_row(call, i), latents=latents[i : i + 1], **steps).images
        bound = 1e-4 * max(1.0, alone.abs().max().item())
        assert (mixed[i : i + 1] - alone).abs().max().item() <= bound, f"image {i}"
    sagfast.enable(pipe, scale=0.0, cfg_rule="fdg", cfg_scale=7.5)
    other_value = pipe(**one_row(call, 1), latents=latents[1:2], **steps).images
    bound = 1e-4 * max(1.0, other_value.abs().max().item())
    assert (mixed[1:2] - other_value).abs().max().item() <= bound
    sagfast.enable(pipe, scale=0.0, cfg_scale=3.0)
    cfg = pipe(**one_row(call, 1), latents=latents[1:2], **steps).images
    assert (mixed[1:2] - cfg).abs().max().item() > 100 * bound
