"""`cfg_rule="tcfg"` against diffusers' TangentialClassifierFreeGuidance: its forward on predictions of
every layout, its final latents in diffusers' modular SDXL and SD3 pipelines against `sagfast.enable` on
the standard pipelines with the same tiny components, and per-image scales in one call against each image
alone. (The tiny SD pipeline's loop parity is a row of tests/test_terms.py's CASES.)

Every parity bound is 1e-4 * max(1, max |ref|), and the rule must move the result from plain CFG by
more than 100x the bound, so a parity that holds because TCFG changed nothing cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance, TangentialClassifierFreeGuidance
from test_guiders import modular_sd3, sd3_reference, sd3_run, sdxl_reference
from test_modular import modular_sdxl, run
from test_terms import one_row, sd_inputs

import sagfast
from sagfast.config import SAGConfig
from sagfast.terms.cfg import RULES


def rule_prediction(o_u, o_c, g):
    """The rule's guided prediction as the engine adds it up: base + sum(scale * (positive - negative))."""
    base, terms = RULES["tcfg"](SAGConfig(cfg_rule="tcfg")).combine(o_u, o_c, g, 0)
    for scale, positive, negative in terms:
        if torch.is_tensor(scale):
            scale = scale.view(-1, *([1] * (o_c.dim() - 1)))
        base = base + scale * (positive - negative)
    return base


@pytest.mark.parametrize("shape", [(3, 4, 16, 16), (2, 16, 8), (2, 4, 3, 8, 6)], ids=["image", "packed", "video"])
def test_the_combine_equals_diffusers_forward(shape):
    g = torch.Generator().manual_seed(0)
    o_u = torch.randn(shape, generator=g)
    o_c = 0.8 * o_u + 0.5 * torch.randn(shape, generator=g)  # correlated, as a model's two branches are
    want = TangentialClassifierFreeGuidance(guidance_scale=5.0).forward(o_c, o_u).pred
    got = rule_prediction(o_u, o_c, 5.0)
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    assert (want - (o_u + 5.0 * (o_c - o_u))).abs().max().item() > 100 * bound  # not plain CFG


def test_images_without_cfg_get_their_cond_prediction_exactly():
    g = torch.Generator().manual_seed(1)
    o_u, o_c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert torch.equal(rule_prediction(o_u, o_c, 1.0), o_c)
    mixed = rule_prediction(o_u, o_c, torch.tensor([1.0, 5.0]))
    assert torch.equal(mixed[0], o_c[0])
    alone = TangentialClassifierFreeGuidance(guidance_scale=5.0).forward(o_c[1:], o_u[1:]).pred
    assert (mixed[1:] - alone).abs().max().item() <= 1e-4 * max(1.0, alone.abs().max().item())


FAMILIES = {"sdxl": (modular_sdxl, run, sdxl_reference), "sd3": (modular_sd3, sd3_run, sd3_reference)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_final_latents_equal_diffusers_guider_in_its_modular_pipeline(family):
    make, go, reference = FAMILIES[family]
    want, _ = go(make(TangentialClassifierFreeGuidance(guidance_scale=5.0)))
    plain, _ = go(make(ClassifierFreeGuidance(guidance_scale=5.0)))
    got = reference(scale=0.0, cfg_rule="tcfg", cfg_scale=5.0)
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    assert (want - plain).abs().max().item() > 100 * bound  # TCFG moved the latents


def test_per_image_scales_in_one_call_equal_each_image_alone():
    # Image 0 without CFG (its cond prediction), images 1 and 2 with two scales: one call equals three.
    make, call, latents = sd_inputs(3)
    scales = [1.0, 3.0, 7.5]
    pipe = sagfast.enable(make(), scale=0.0, cfg_rule="tcfg", cfg_scale=scales)
    steps = dict(guidance_scale=7.5, num_inference_steps=3, output_type="latent")  # > 1: the pipeline batches CFG
    mixed = pipe(**call, latents=latents, **steps).images
    for i, g in enumerate(scales):
        sagfast.enable(pipe, scale=0.0, cfg_rule="tcfg", cfg_scale=g)
        alone = pipe(**one_row(call, i), latents=latents[i : i + 1], **steps).images
        bound = 1e-4 * max(1.0, alone.abs().max().item())
        assert (mixed[i : i + 1] - alone).abs().max().item() <= bound, f"image {i}"
    sagfast.enable(pipe, scale=0.0, cfg_rule="tcfg", cfg_scale=7.5)
    same = pipe(**one_row(call, 1), latents=latents[1:2], **steps).images
    assert (mixed[1:2] - same).abs().max().item() > 100 * 1e-4 * max(1.0, same.abs().max().item())  # the scales differed
