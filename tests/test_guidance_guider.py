"""`sagfast.guiders.Guidance(guidance_scale, **enable keywords)` in diffusers' modular pipelines (SDXL,
SD3, Wan 2.1) equals `sagfast.enable(standard pipeline, **the same keywords)` on the same tiny random
components, latents, steps and CFG scale (5.0): two code paths (the modular loop running the guider's
conditions one pass each, or joined by `batch_guidance`; the standard pipeline's guided call) meeting in
the final latents within 1e-4 x max(1, max |ref|). Each case moves the latents from plain CFG (diffusers'
ClassifierFreeGuidance in the same modular pipeline) by more than 100x that bound, so that a guider
that ran no term, or the wrong one, fails.

The modular loop runs each condition as its own model call where the standard pipeline batches [uncond,
cond]: float reordering of about 1e-4 on latents of size ~60 (SDXL).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance
from test_guiders import modular_sd3, sd3_reference, sd3_run, sdxl_reference
from test_modular import modular_sdxl, run
from test_video import modular_wan, wan, wan_call

import sagfast
from sagfast.guiders import Guidance, SelfAttentionGuidance
from sagfast.modular import batch_guidance

SDXL_CASES = {
    "sag exact": dict(scale=0.75),
    "sag batched": dict(scale=0.75, mode="batched"),
    "pag": dict(scale=0.0, pag_scale=3.0),
    "seg": dict(scale=0.0, seg_scale=10.0),  # the tiny UNet moves little under SEG: 3.0 moves it 0.26
    "apg": dict(scale=0.0, cfg_rule="apg", apg_momentum=-0.5, apg_eta=0.0),
    "cfg-zero-star": dict(scale=0.0, cfg_rule="cfg_zero_star"),
    "sag + pag": dict(scale=0.75, pag_scale=3.0),
    "sag batched + seg + pag interval": dict(scale=0.75, mode="batched", seg_scale=2.0, pag_scale=3.0, pag_interval=(0.25, 1.0)),
    "tpg": dict(scale=0.0, tpg_scale=3.0),
    "tcfg": dict(scale=0.0, cfg_rule="tcfg"),
    "mambo": dict(scale=0.0, cfg_rule="mambo", mambo_alpha=2.0),
    "fdg": dict(scale=0.0, cfg_rule="fdg"),
}


def distances(got, want, cfg) -> tuple:
    """(max |got - want|, the bound, max |want - cfg|)."""
    bound = 1e-4 * max(1.0, want.abs().max().item())
    return (got - want).abs().max().item(), bound, (want - cfg).abs().max().item()


def sdxl_case(keywords: dict, joined: bool = False) -> tuple:
    pipe = modular_sdxl(ClassifierFreeGuidance(guidance_scale=5.0))
    cfg, _ = run(pipe)
    if joined:
        batch_guidance(pipe)
    pipe.update_components(guider=Guidance(guidance_scale=5.0, **keywords))
    got, sizes = run(pipe)
    return distances(got, sdxl_reference(**keywords), cfg), sizes


@pytest.mark.parametrize("case", list(SDXL_CASES))
def test_guidance_in_the_modular_sdxl_pipeline_equals_sagfast_enable(case):
    (diff, bound, effect), _ = sdxl_case(SDXL_CASES[case])
    assert diff <= bound
    assert effect > 100 * bound  # the guidance moved the latents


@pytest.mark.parametrize(
    "case, per_step",
    [
        ("sag exact", [2, 1] * 4),  # [cond, uncond], then the degraded rows built from them
        ("sag batched", [2, 1, 3, 3, 3]),  # the degraded rows join the main call after step 0
        ("seg", [3] * 4),  # [cond, uncond, smoothed]: SEG's rule on its rows only
        # Step 0 exact: [cond, uncond, seg], then the degraded rows; then PAG from step 1 (its interval) and
        # everything in one call.
        ("sag batched + seg + pag interval", [3, 1, 5, 5, 5]),
    ],
)
def test_guidance_through_batch_guidance_equals_sagfast_enable(case, per_step):
    (diff, bound, effect), sizes = sdxl_case(SDXL_CASES[case], joined=True)
    assert sizes == per_step
    assert diff <= bound
    assert effect > 100 * bound


def sd3_case(keywords: dict) -> tuple:
    """(diff, bound, effect) of Guidance in the modular SD3 pipeline against sagfast.enable (PAG on block 1)."""
    keywords = dict(keywords, pag_layers="transformer_blocks.1")
    pipe = modular_sd3(ClassifierFreeGuidance(guidance_scale=5.0))
    cfg, _ = sd3_run(pipe)
    pipe.update_components(guider=Guidance(guidance_scale=5.0, **keywords))
    got, _ = sd3_run(pipe)
    return distances(got, sd3_reference(**keywords), cfg)


def wan_case(keywords: dict) -> tuple:
    """(diff, bound, effect) of Guidance in the modular Wan pipeline against sagfast.enable."""
    modular = modular_wan(wan(), ClassifierFreeGuidance(guidance_scale=5.0))
    cfg = modular(**wan_call(), output="latents")
    modular.update_components(guider=Guidance(guidance_scale=5.0, **keywords))
    got = modular(**wan_call(), output="latents")
    want = sagfast.enable(wan(), **keywords)(**wan_call(), guidance_scale=5.0, output_type="latent").frames
    return distances(got, want, cfg)


@pytest.mark.parametrize("keywords", [dict(scale=0.75), dict(scale=0.75, mode="batched"), dict(scale=0.0, pag_scale=3.0)])
def test_guidance_in_the_modular_sd3_pipeline_equals_sagfast_enable(keywords):
    diff, bound, effect = sd3_case(keywords)
    assert diff <= bound
    assert effect > 100 * bound


@pytest.mark.parametrize(
    "keywords",
    [
        dict(scale=0.75),
        dict(scale=0.75, mode="batched"),
        dict(scale=0.0, stg_scale=1.0),
        dict(scale=0.0, stg_scale=1.0, stg_mode="attention"),
    ],
)
def test_guidance_in_the_modular_wan_pipeline_equals_sagfast_enable(keywords):
    diff, bound, effect = wan_case(keywords)
    assert diff <= bound
    assert effect > 100 * bound


def test_the_selfattentionguidance_is_guidance_under_its_own_names():
    # The thin subclass: its fields are Guidance's keywords under other names, the same passes and combine.
    pipe = modular_sdxl(ClassifierFreeGuidance(guidance_scale=5.0))
    pipe.update_components(guider=Guidance(guidance_scale=5.0, scale=0.5, mode="batched", pag_scale=2.0, pag_interval=(0.0, 0.5)))
    want, _ = run(pipe)
    guider = SelfAttentionGuidance(
        guidance_scale=5.0, sag_scale=0.5, mode="batched", perturbed_guidance_scale=2.0, perturbed_guidance_stop=0.5
    )
    pipe.update_components(guider=guider)
    got, _ = run(pipe)
    assert isinstance(guider, Guidance) and torch.equal(got, want)


def test_the_config_round_trips_through_save_and_load(tmp_path):
    guider = Guidance(guidance_scale=4.0, scale=[0.5], pag_scale=2.0, pag_layers=["mid"], seg_interval=(0.1, 0.9), cfg_rule="apg")
    guider.save_pretrained(tmp_path)
    loaded = Guidance.from_pretrained(tmp_path)
    assert loaded.settings == guider.settings
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(guider.config)
    assert loaded.new(pag_scale=1.0).settings == dataclasses.replace(guider.settings, pag_scale=1.0)


@pytest.mark.parametrize(
    "keywords, message",
    [
        (dict(pag_scale=-1.0), "pag_scale must be >= 0, got -1.0"),
        (dict(cfg_rule="nope"), "cfg_rule must be one of"),
        (dict(sag_scale=0.5), r"unknown SAGConfig field\(s\) \['sag_scale'\]"),
        (dict(cfg_scale=3.0), "cfg_scale is this guider's guidance_scale"),
        (dict(cfg_interval=(0.0, 0.5)), "cfg_interval is this guider's start and stop"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be finite, got inf"),
    ],
)
def test_bad_keywords_are_refused_by_sagconfigs_checks(keywords, message):
    with pytest.raises(ValueError, match=message):
        Guidance(**keywords)


if __name__ == "__main__":  # the distances of docs/modular.md: python tests/test_guidance_guider.py
    print("| pipeline | keywords | max abs diff to sagfast.enable | bound | effect (to CFG) |")
    print("|---|---|---|---|---|")
    for case, keywords in SDXL_CASES.items():
        (diff, bound, effect), _ = sdxl_case(keywords)
        print(f"| sdxl | {case} | {diff:.1e} | {bound:.1e} | {effect:.2f} |")
    for keywords in (dict(scale=0.75), dict(scale=0.0, pag_scale=3.0)):
        diff, bound, effect = sd3_case(keywords)
        print(f"| sd3 | {keywords} | {diff:.1e} | {bound:.1e} | {effect:.2f} |")
    for keywords in (dict(scale=0.75), dict(scale=0.0, stg_scale=1.0)):
        diff, bound, effect = wan_case(keywords)
        print(f"| wan | {keywords} | {diff:.1e} | {bound:.1e} | {effect:.2f} |")
