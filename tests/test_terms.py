"""The guidance terms and CFG rules against diffusers' own guider objects, and per-image settings.

The reference is a denoising loop that does per step what diffusers' modular pipelines do with a
guider (`set_state`, `prepare_inputs`, for each batch `prepare_models` / the UNet / `cleanup_models`,
the guider's call, `scheduler.step`), on the plain UNet; sagfast runs the same components through
`StableDiffusionPipeline` with the same latents. Final latents must agree within
1e-4 * max(1, max |ref|), and each term must move them by more than 100x that from plain CFG, so a
parity that holds because nothing happened cannot pass.

diffusers 0.42.1's guiders are corrected in the test where they are faulty (each fault is named at
its fix): SEG's `prepare_models` never counts its batches (its blur hook is never installed),
`_gaussian_blur_2d` swaps the finite and infinite branches, and SEG's and PAG's step ranges exclude
their start step (`start < i`), where every other guider and sagfast's intervals include it.
"""

from __future__ import annotations

import math

import diffusers.hooks.smoothed_energy_guidance_utils as seg_utils
import pytest
import torch
import torch.nn.functional as F
from components import prompt_embeds, sd_pipeline
from diffusers import DDIMScheduler
from diffusers.guiders import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
    FrequencyDecoupledGuidance,
    MagnitudeAwareGuidance,
    PerturbedAttentionGuidance,
    SmoothedEnergyGuidance,
    TangentialClassifierFreeGuidance,
)
from diffusers.guiders.guider_utils import GuiderOutput
from diffusers.hooks import LayerSkipConfig
from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig
from test_families_flow import embeds, sd3

import sagfast
from sagfast.terms.seg import blur_queries

STEPS = 4
SIZE = 32  # latent 16 x 16, the mid block's map 8 x 8: square, as diffusers' SEG blur assumes
MID = "mid_block.attentions.0.transformer_blocks"


class FixedSEG(SmoothedEnergyGuidance):
    def prepare_models(self, denoiser):
        self._count_prepared += 1  # diffusers forgets this: its hook is then never installed
        super().prepare_models(denoiser)

    def _is_seg_enabled(self):
        return self._enabled and self.seg_guidance_scale != 0  # the test runs it at every step


class FixedPAG(PerturbedAttentionGuidance):
    def _is_slg_enabled(self):
        return self._enabled and self.skip_layer_guidance_scale != 0  # diffusers skips step 0


class FlatMAMBO(MagnitudeAwareGuidance):
    """diffusers' MAMBO-G on each prediction flattened to [B, C, H * W]: its norm (torch.norm over the
    dimensions 1..n-1) raises on 4-D latents and is the L2 norm over all of an image's values on 3-D ones,
    which is what sagfast's rule takes on every layout."""

    def forward(self, pred_cond, pred_uncond=None):
        flat = super().forward(pred_cond.flatten(2), None if pred_uncond is None else pred_uncond.flatten(2))
        return GuiderOutput(pred=flat.pred.reshape(pred_cond.shape), pred_cond=pred_cond, pred_uncond=pred_uncond)


def fixed_blur(query, kernel_size, sigma, sigma_threshold_inf):
    """diffusers' `_gaussian_blur_2d` with its two branches the right way round (PR 14187)."""
    b, n, c = query.shape
    side = int(n**0.5)
    grid = query.permute(0, 2, 1).reshape(b, c, side, side)
    if sigma >= sigma_threshold_inf:
        grid = grid.mean(dim=(-2, -1), keepdim=True).expand_as(grid)
    else:
        kernel_size = min(kernel_size, side - (side % 2 - 1))
        half = (kernel_size - 1) / 2
        x = torch.linspace(-half, half, steps=kernel_size)
        pdf = torch.exp(-0.5 * (x / sigma).pow(2))
        k1 = (pdf / pdf.sum()).to(query)
        k2 = torch.matmul(k1[:, None], k1[None, :]).expand(c, 1, kernel_size, kernel_size)
        grid = F.conv2d(F.pad(grid, [kernel_size // 2] * 4, mode="reflect"), k2, groups=c)
    return grid.reshape(b, c, n).permute(0, 2, 1)


def start_latents(n=1):
    return torch.randn(n, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(5))


def guider_latents(guider, latents):
    """The final latents of diffusers' modular denoise loop with `guider` on the tiny SD UNet."""
    pipe = sd_pipeline()
    unet, scheduler = pipe.unet, pipe.scheduler
    pe, ne = prompt_embeds(latents.shape[0])
    scheduler.set_timesteps(STEPS)
    latents = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            guider.set_state(step=i, num_inference_steps=STEPS, timestep=t)
            batches = guider.prepare_inputs({"encoder_hidden_states": (pe, ne)})
            for batch in batches:
                guider.prepare_models(unet)
                x = scheduler.scale_model_input(latents, t)
                batch.noise_pred = unet(x, t, encoder_hidden_states=batch.encoder_hidden_states, return_dict=False)[0]
                guider.cleanup_models(unet)
            pred = guider(batches).pred
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return latents


def sagfast_latents(latents, guidance_scale=5.0, **config):
    pipe = sagfast.enable(sd_pipeline(), **{"scale": 0.0, **config})
    pe, ne = prompt_embeds(latents.shape[0])
    out = pipe(
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        latents=latents.clone(),
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        height=SIZE,
        width=SIZE,
        output_type="latent",
    )
    return out.images


CASES = {
    "cfg": (lambda: ClassifierFreeGuidance(guidance_scale=5.0), dict(cfg_scale=5.0)),
    "apg": (
        lambda: AdaptiveProjectedGuidance(guidance_scale=5.0, eta=0.0),
        dict(cfg_rule="apg", apg_eta=0.0),
    ),
    "apg-momentum": (
        lambda: AdaptiveProjectedGuidance(
            guidance_scale=5.0, adaptive_projected_guidance_momentum=-0.5, adaptive_projected_guidance_rescale=2.0, eta=0.0
        ),
        dict(cfg_rule="apg", apg_momentum=-0.5, apg_rescale=2.0, apg_eta=0.0),
    ),
    "cfg-zero-star": (lambda: ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=1), dict(cfg_rule="cfg_zero_star")),
    "tcfg": (lambda: TangentialClassifierFreeGuidance(guidance_scale=5.0), dict(cfg_rule="tcfg")),
    "mambo": (lambda: FlatMAMBO(guidance_scale=5.0), dict(cfg_rule="mambo")),
    "fdg": (lambda: FrequencyDecoupledGuidance(guidance_scales=[10.0, 5.0]), dict(cfg_rule="fdg", fdg_scales=(10.0, 5.0))),
    "pag": (
        lambda: FixedPAG(
            guidance_scale=5.0,
            perturbed_guidance_scale=3.0,
            perturbed_guidance_start=0.0,
            perturbed_guidance_stop=1.0,
            perturbed_guidance_config=LayerSkipConfig(indices=[0], fqn=MID, skip_attention=False, skip_attention_scores=True),
        ),
        dict(pag_scale=3.0, pag_layers="mid"),
    ),
    "seg-infinite": (
        lambda: FixedSEG(
            guidance_scale=5.0, seg_guidance_scale=10.0, seg_guidance_config=SmoothedEnergyGuidanceConfig(indices=[0], fqn=MID)
        ),
        dict(seg_scale=10.0, seg_layers="mid"),
    ),
    "seg-sigma-2": (
        lambda: FixedSEG(
            guidance_scale=5.0,
            seg_guidance_scale=10.0,
            seg_blur_sigma=2.0,
            seg_guidance_config=SmoothedEnergyGuidanceConfig(indices=[0], fqn=MID),
        ),
        dict(seg_scale=10.0, seg_layers="mid", seg_blur_sigma=2.0),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_term_matches_diffusers_guider(case, monkeypatch):
    monkeypatch.setattr(seg_utils, "_gaussian_blur_2d", fixed_blur)
    make_guider, config = CASES[case]
    x = start_latents()
    want = guider_latents(make_guider(), x)
    got = sagfast_latents(x, **config)
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    if case != "cfg":
        plain = guider_latents(ClassifierFreeGuidance(guidance_scale=5.0), x)
        assert (want - plain).abs().max().item() > 100 * bound


@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_sagfast_cfg_equals_the_pipelines_cfg_line_with_sag_and_pag(mode):
    # Two layouts of one formula: o[k] + terms through the pipeline's CFG line, and R computed by
    # sagfast and returned for both halves.
    x = start_latents()
    line = sagfast_latents(x, guidance_scale=5.0, scale=0.75, pag_scale=2.0, mode=mode)
    owned = sagfast_latents(x, guidance_scale=2.0, cfg_scale=5.0, scale=0.75, pag_scale=2.0, mode=mode)
    assert (owned - line).abs().max().item() <= 1e-5 * max(1.0, line.abs().max().item())


def dense_blur(q, h, w, sigma):
    """The test's own query blur: each output token a weighted sum over the reflect-padded grid with
    the 2-D kernel written out as one (kh x kw) window, per axis cut as the SEG reference cuts it; the
    mean query where the blur is infinite."""
    if sigma >= 9999.0:
        return q.mean(dim=1, keepdim=True).expand_as(q)
    b, n, c = q.shape
    size = math.ceil(6 * sigma) + 1
    size -= 1 - size % 2 if size % 2 == 0 else 0
    kh, kw = (min(size, side - (side % 2 - 1)) for side in (h, w))

    def pdf(k):
        x = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
        p = torch.exp(-0.5 * (x / sigma) ** 2)
        return p / p.sum()

    kernel = pdf(kh)[:, None] * pdf(kw)[None, :]
    grid = q.double().transpose(1, 2).reshape(b, c, h, w)
    padded = F.pad(grid, (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    out = torch.zeros_like(grid)
    for i in range(kh):
        for j in range(kw):
            out += kernel[i, j] * padded[..., i : i + h, j : j + w]
    return out.reshape(b, c, n).transpose(1, 2).to(q.dtype)


@pytest.mark.parametrize("h, w, sigma", [(5, 7, 1.0), (8, 3, 0.6), (6, 6, 2.5)])
def test_query_blur_matches_a_dense_2d_gaussian(h, w, sigma):
    q = torch.randn(2, h * w, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(blur_queries(q, h, w, sigma), dense_blur(q, h, w, sigma), rtol=1e-5, atol=1e-6)
    if h == w:  # diffusers' blur (its branches put right) on a square grid
        size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
        torch.testing.assert_close(blur_queries(q, h, w, sigma), fixed_blur(q, size, sigma, 9999.0), rtol=1e-5, atol=1e-6)


def one_step(pipe, call, **kwargs):
    return pipe(**call, **kwargs, num_inference_steps=1, output_type="latent").images


@pytest.mark.parametrize("sigma", [9999999.0, 1.0], ids=["infinite", "sigma-1"])
@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_seg_blurs_the_queries_on_the_layers_true_grid(family, sigma):
    # One step is linear in the model's output (DDIM: in eps; flow-matching Euler: in v), so the SEG
    # step is L_cfg + s * (L_cond - L_smoothed), each L a plain one-step run: L_smoothed with the
    # test's own blur hooked on the layer's `to_q`, on a non-square grid (SD: the UNet's mid level
    # 10 x 12 of a 20 x 24 latent; SD3: 6 x 5 patches of a 12 x 10 latent, joint attention).
    make, call, latents = (sd_inputs if family == "sd" else sd3_inputs)(1)
    pipe = make()
    if family == "sd":  # trailing spacing: the one step starts at t = 999, where the model's output counts
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        layers, attn, grid = "mid", pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1, (10, 12)
    else:
        layers, attn, grid = "transformer_blocks.1", pipe.transformer.transformer_blocks[1].attn, (6, 5)
    call = dict(call, latents=latents)
    cfg, cond = one_step(pipe, call, guidance_scale=5.0), one_step(pipe, call, guidance_scale=1.0)
    handle = attn.to_q.register_forward_hook(lambda module, args, out: dense_blur(out, *grid, sigma))
    smoothed = one_step(pipe, call, guidance_scale=1.0)
    handle.remove()
    want = cfg + 5.0 * (cond - smoothed)
    sagfast.enable(pipe, scale=0.0, seg_scale=5.0, seg_layers=layers, seg_blur_sigma=sigma)
    got = one_step(pipe, call, guidance_scale=5.0)
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    assert (want - cfg).abs().max().item() > 100 * bound


def test_infinite_blur_is_the_mean_query():
    q = torch.randn(2, 15, 4)
    out = blur_queries(q, 3, 5, 9999.0)
    assert torch.allclose(out, q.mean(dim=1, keepdim=True).expand_as(q))


# --- Per-image settings: one call of three images equals three one-image calls ------------------------

PER_IMAGE = dict(scale=[0.0, 0.5, 1.0], cfg_scale=[1.0, 3.0, 7.5], pag_scale=[0.0, 3.0, 1.0])


def sd_inputs(n):
    pe, ne = prompt_embeds(n, seed=3)
    latents = torch.randn(n, 4, 20, 24, generator=torch.Generator().manual_seed(5))
    return sd_pipeline, dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=40, width=48), latents


def sd3_inputs(n):
    pe, pooled = embeds(n=n, seed=1)
    ne, npooled = embeds(n=n, seed=2)
    latents = torch.randn(n, 4, 12, 10, generator=torch.Generator().manual_seed(5))
    call = dict(
        prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt_embeds=ne, negative_pooled_prompt_embeds=npooled, height=24, width=20
    )
    return sd3, call, latents


def one_row(call: dict, i: int) -> dict:
    return {k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in call.items()}


@pytest.mark.parametrize("mode", ["exact", "batched"])
@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_images_with_mixed_settings_in_one_call_equal_their_own_calls(family, mode):
    make, call, latents = (sd_inputs if family == "sd" else sd3_inputs)(3)
    pipe = make()
    layers = "mid" if family == "sd" else "transformer_blocks.1"
    sagfast.enable(pipe, mode=mode, pag_layers=layers, **PER_IMAGE)
    mixed = pipe(**call, latents=latents, guidance_scale=7.5, num_inference_steps=3, output_type="latent").images
    for i in range(3):
        g = PER_IMAGE["cfg_scale"][i]
        sagfast.enable(pipe, mode=mode, pag_layers=layers, scale=PER_IMAGE["scale"][i], pag_scale=PER_IMAGE["pag_scale"][i])
        alone = pipe(**one_row(call, i), latents=latents[i : i + 1], guidance_scale=g, num_inference_steps=3, output_type="latent").images
        bound = 1e-4 * max(1.0, alone.abs().max().item())
        assert (mixed[i : i + 1] - alone).abs().max().item() <= bound, f"image {i}"
    assert (mixed[1] - mixed[2]).abs().max() > 0.01  # the settings did something different per image


@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_cfg_scale_one_as_a_number_or_a_list_is_sag_without_cfg(mode):
    # In a CFG batch (guidance_scale 5), cfg_scale <= 1 guides each image without CFG: its SAG guide is
    # its cond row, one number as one per image. Reference: the pipeline without CFG (guidance_scale 1,
    # cond rows only), its SAG guided on the cond row.
    make, call, latents = sd_inputs(2)
    pipe = make()
    steps = dict(num_inference_steps=3, output_type="latent")
    sagfast.enable(pipe, mode=mode, scale=0.75)
    cond_only = dict(prompt_embeds=call["prompt_embeds"], height=call["height"], width=call["width"])
    want = pipe(**cond_only, latents=latents, guidance_scale=1.0, **steps).images
    bound = 1e-5 * max(1.0, want.abs().max().item())
    for cfg_scale in (1.0, [1.0, 1.0], 0.5):
        sagfast.enable(pipe, mode=mode, scale=0.75, cfg_scale=cfg_scale)
        got = pipe(**call, latents=latents, guidance_scale=5.0, **steps).images
        assert (got - want).abs().max().item() <= bound, cfg_scale
    sagfast.enable(pipe, mode=mode, scale=0.75, cfg_scale=5.0)
    cfg = pipe(**call, latents=latents, guidance_scale=5.0, **steps).images
    assert (cfg - want).abs().max().item() > 100 * bound  # CFG on moves the latents


@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_an_image_without_cfg_stays_as_if_alone_when_the_others_cfg_interval_ends(mode):
    # cfg_scale [5, 1] with cfg_interval (0, 0.5): at step 2 of 4 image 0's CFG ends (its SAG guide
    # turns from its uncond row to its cond row, so its batched-mode eps and mask of step 1 are not its
    # guide's), image 1's guide stays its cond row. Alone, image 0 runs that step exact, image 1
    # batched: so does each in the mixed call.
    make, call, latents = sd_inputs(2)
    pipe = make()
    steps = dict(num_inference_steps=4, output_type="latent")
    sagfast.enable(pipe, mode=mode, scale=0.75, cfg_scale=[5.0, 1.0], cfg_interval=(0.0, 0.5))
    sizes = batch_sizes(pipe, **call, latents=latents, guidance_scale=5.0, **steps)
    mixed = pipe(**call, latents=latents, guidance_scale=5.0, **steps).images
    if mode == "batched":
        # exact first step; batched; CFG ends: main (2) + image 1's degraded row, then image 0's; batched
        assert sizes == [4, 2, 6, 3, 1, 4]
    for i, g in enumerate([5.0, 1.0]):
        sagfast.enable(pipe, mode=mode, scale=0.75, cfg_interval=(0.0, 0.5))
        alone = pipe(**one_row(call, i), latents=latents[i : i + 1], guidance_scale=g, **steps).images
        bound = 1e-5 * max(1.0, alone.abs().max().item())
        assert (mixed[i : i + 1] - alone).abs().max().item() <= bound, f"image {i}"


def test_a_per_image_field_of_the_wrong_length_is_refused_and_the_pipeline_still_runs():
    pipe = sd_pipeline()
    processors = dict(pipe.unet.attn_processors)
    sagfast.enable(pipe, pag_scale=[1.0, 2.0, 3.0])
    pe, ne = prompt_embeds(2)
    call = dict(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=2, output_type="latent", height=32, width=32)
    with pytest.raises(ValueError, match=r"pag_scale has 3 values, but this call makes 2 images"):
        pipe(**call)
    sagfast.enable(pipe, pag_scale=[1.0, 2.0])
    pipe(**call)
    sagfast.disable(pipe)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in processors.items()}


def test_cfg_per_image_needs_a_cfg_batch():
    pipe = sagfast.enable(sd_pipeline(), cfg_scale=[1.0, 4.0])
    pe, _ = prompt_embeds(2)
    with pytest.raises(ValueError, match=r"guidance_scale > 1"):
        pipe(prompt_embeds=pe, guidance_scale=1.0, num_inference_steps=2, output_type="latent", height=32, width=32)


def test_sagfast_cfg_refuses_guidance_rescale():
    pipe = sagfast.enable(sd_pipeline(), cfg_rule="apg")
    pe, ne = prompt_embeds(1)
    with pytest.raises(ValueError, match=r"guidance_rescale"):
        pipe(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_rescale=0.7, num_inference_steps=2, output_type="latent")


# --- Calls per step ------------------------------------------------------------------------------------


def batch_sizes(pipe, **call):
    sizes = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(args[0].shape[0]), with_kwargs=True)
    try:
        pipe(**call)
    finally:
        handle.remove()
    return sizes


@pytest.mark.parametrize(
    "config, per_step",
    [
        (dict(scale=0.0, cfg_rule="apg"), [2]),
        (dict(scale=0.0, cfg_rule="cfg_zero_star"), [2]),
        (dict(scale=0.0, seg_scale=2.0), [3]),
        (dict(scale=0.0, pag_scale=2.0, seg_scale=2.0), [4]),
        (dict(scale=0.75, pag_scale=2.0, seg_scale=2.0, mode="exact"), [4, 1]),
        (dict(scale=0.75, pag_scale=2.0, seg_scale=2.0, mode="batched"), [5]),
    ],
    ids=["apg", "cfg-zero-star", "seg", "pag+seg", "sag+pag+seg-exact", "sag+pag+seg-batched"],
)
def test_rows_per_model_call(config, per_step):
    pipe = sagfast.enable(sd_pipeline(), **config)
    pe, ne = prompt_embeds(1)
    sizes = batch_sizes(pipe, prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=3, output_type="latent", height=32, width=32)
    if config.get("mode") == "batched":  # the first step of a call is exact
        assert sizes == [4, 1, 5, 5]
    else:
        assert sizes == per_step * 3


if __name__ == "__main__":  # the parity table of docs/guidance-engine.md: python tests/test_terms.py
    seg_utils._gaussian_blur_2d = fixed_blur
    x = start_latents()
    plain = guider_latents(ClassifierFreeGuidance(guidance_scale=5.0), x)
    print("| term | max abs diff | bound | max |ref| | effect: max |term - CFG| |")
    print("|---|---|---|---|---|")
    for case, (make_guider, config) in CASES.items():
        want = guider_latents(make_guider(), x)
        diff = (sagfast_latents(x, **config) - want).abs().max().item()
        bound = 1e-4 * max(1.0, want.abs().max().item())
        effect = (want - plain).abs().max().item()
        print(f"| {case} | {diff:.1e} | {bound:.1e} | {want.abs().max().item():.1f} | {effect:.2f} |")
    print()
    print("| family | mode | image 0 | image 1 | image 2 | max |one-image| |")
    print("|---|---|---|---|---|---|")
    for family in ("sd", "sd3"):
        for mode in ("exact", "batched"):
            make, call, latents = (sd_inputs if family == "sd" else sd3_inputs)(3)
            pipe, layers = make(), "mid" if family == "sd" else "transformer_blocks.1"
            sagfast.enable(pipe, mode=mode, pag_layers=layers, **PER_IMAGE)
            mixed = pipe(**call, latents=latents, guidance_scale=7.5, num_inference_steps=3, output_type="latent").images
            diffs, top = [], 0.0
            for i in range(3):
                sagfast.enable(pipe, mode=mode, pag_layers=layers, scale=PER_IMAGE["scale"][i], pag_scale=PER_IMAGE["pag_scale"][i])
                g = PER_IMAGE["cfg_scale"][i]
                alone = pipe(
                    **one_row(call, i), latents=latents[i : i + 1], guidance_scale=g, num_inference_steps=3, output_type="latent"
                ).images
                diffs.append((mixed[i : i + 1] - alone).abs().max().item())
                top = max(top, alone.abs().max().item())
            print(f"| {family} | {mode} | " + " | ".join(f"{d:.1e}" for d in diffs) + f" | {top:.1f} |")
