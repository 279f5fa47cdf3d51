"""`cfg_rule="mambo"` against diffusers' MagnitudeAwareGuidance: its forward on 3-D predictions, its
final latents in diffusers' modular SDXL and SD3 pipelines against `sagfast.enable` on the standard
pipelines with the same tiny components, and per-image scales in one call against each image alone.
(The tiny SD pipeline's loop parity is a row of tests/test_terms.py's CASES.)

diffusers 0.42.1's guider raises on 4-D latents (`torch.norm` with three dimensions); on 3-D ones its
norm is the L2 norm over all of an image's values, which sagfast takes on every layout. Where the model's
predictions are 4-D the reference is diffusers' guider on them flattened to [B, C, H * W]
(`test_terms.FlatMAMBO`: a test-side view of the inputs; nothing in sagfast is patched).

Every parity bound is 1e-4 * max(1, max |ref|), and the rule must move the result from plain CFG by
more than 100x the bound, so a parity that holds because MAMBO-G changed nothing cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance, MagnitudeAwareGuidance
from test_guiders import modular_sd3, sd3_reference, sd3_run, sdxl_reference
from test_modular import modular_sdxl, run
from test_terms import FlatMAMBO, one_row, sd_inputs

import sagfast
from sagfast.config import SAGConfig
from sagfast.terms.cfg import RULES


def rule_prediction(o_u, o_c, g, **config):
    """The rule's guided prediction as the engine adds it up: base + sum(scale * (positive - negative))."""
    base, terms = RULES["mambo"](SAGConfig(cfg_rule="mambo", **config)).combine(o_u, o_c, g, 0)
    for scale, positive, negative in terms:
        if torch.is_tensor(scale):
            scale = scale.view(-1, *([1] * (o_c.dim() - 1)))
        base = base + scale * (positive - negative)
    return base


def predictions(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    o_u = torch.randn(shape, generator=g)
    return o_u, 0.95 * o_u + 0.1 * torch.randn(shape, generator=g)  # close branches: g' well inside (1, g)


@pytest.mark.parametrize("alpha", [8.0, 2.0])
def test_the_combine_equals_diffusers_forward_on_3d_predictions(alpha):
    o_u, o_c = predictions((3, 16, 8))
    want = MagnitudeAwareGuidance(guidance_scale=5.0, alpha=alpha).forward(o_c, o_u).pred
    got = rule_prediction(o_u, o_c, 5.0, mambo_alpha=alpha)
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    assert (want - (o_u + 5.0 * (o_c - o_u))).abs().max().item() > 100 * bound  # not plain CFG


@pytest.mark.parametrize("shape", [(2, 4, 8, 6), (2, 4, 3, 8, 6)], ids=["image", "video"])
def test_the_norm_is_over_all_of_an_images_values(shape):
    o_u, o_c = predictions(shape)
    with pytest.raises(RuntimeError, match="dim must be a 2-tuple"):  # why the docs say what the norm is
        MagnitudeAwareGuidance(guidance_scale=5.0).forward(o_c, o_u)
    want = FlatMAMBO(guidance_scale=5.0).forward(o_c, o_u).pred
    got = rule_prediction(o_u, o_c, 5.0)
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def test_images_without_cfg_get_their_cond_prediction_exactly():
    o_u, o_c = predictions((2, 4, 8, 8), seed=1)
    assert torch.equal(rule_prediction(o_u, o_c, 1.0), o_c)
    mixed = rule_prediction(o_u, o_c, torch.tensor([1.0, 5.0]))
    assert torch.equal(mixed[0], o_c[0])
    alone = FlatMAMBO(guidance_scale=5.0).forward(o_c[1:], o_u[1:]).pred
    assert (mixed[1:] - alone).abs().max().item() <= 1e-4 * max(1.0, alone.abs().max().item())


FAMILIES = {"sdxl": (modular_sdxl, run, sdxl_reference), "sd3": (modular_sd3, sd3_run, sd3_reference)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_final_latents_equal_diffusers_guider_in_its_modular_pipeline(family):
    # alpha 2, not the default: the setting reaches the rule (at 8 the results differ by far more than the bound).
    make, go, reference = FAMILIES[family]
    want, _ = go(make(FlatMAMBO(guidance_scale=5.0, alpha=2.0)))
    plain, _ = go(make(ClassifierFreeGuidance(guidance_scale=5.0)))
    got = reference(scale=0.0, cfg_rule="mambo", cfg_scale=5.0, mambo_alpha=2.0)
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    assert (want - plain).abs().max().item() > 100 * bound  # MAMBO-G moved the latents


def test_per_image_scales_in_one_call_equal_each_image_alone():
    # Image 0 without CFG (its cond prediction), images 1 and 2 with two scales: one call equals three.
    make, call, latents = sd_inputs(3)
    scales = [1.0, 3.0, 7.5]
    pipe = sagfast.enable(make(), scale=0.0, cfg_rule="mambo", cfg_scale=scales)
    steps = dict(guidance_scale=7.5, num_inference_steps=3, output_type="latent")  # > 1: the pipeline batches CFG
    mixed = pipe(**call, latents=latents, **steps).images
    for i, g in enumerate(scales):
        sagfast.enable(pipe, scale=0.0, cfg_rule="mambo", cfg_scale=g)
        alone = pipe(**one_row(call, i), latents=latents[i : i + 1], **steps).images
        bound = 1e-4 * max(1.0, alone.abs().max().item())
        assert (mixed[i : i + 1] - alone).abs().max().item() <= bound, f"image {i}"
    sagfast.enable(pipe, scale=0.0, cfg_rule="mambo", cfg_scale=7.5)
    same = pipe(**one_row(call, 1), latents=latents[1:2], **steps).images
    assert (mixed[1:2] - same).abs().max().item() > 100 * 1e-4 * max(1.0, same.abs().max().item())  # the scales differed
