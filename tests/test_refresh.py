"""Term refresh (`<term>_refresh = k`): a term's rows run at its first step and every k-th step after,
and the steps between add `s * d`, its last difference `o_source - o_term` per image.

The reference is a denoising loop written here, independent of sagfast's engine: the tiny SD UNet on
[uncond, cond] with a processor on the mid block's self-attention that keeps its attention
probabilities (the SAG mask: a key is masked where the attention it receives, averaged over heads, is
above 1), SAG's degraded input by the paper's formula (exact: this step's x0, eps and mask; batched:
this step's input with the previous step's eps and mask), and the kept difference between.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from components import prompt_embeds, sd_pipeline
from diffusers.models.attention_processor import AttnProcessor
from test_terms import SIZE, sagfast_latents, start_latents

import sagfast
from sagfast.config import SAGConfig

STEPS = 4
GUIDANCE = 5.0
SAG_SCALE = 0.75


class StoreProbs(AttnProcessor):
    """diffusers' plain attention processor, keeping the attention probabilities of its last call."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        get = attn.get_attention_scores

        def record(query, key, mask=None):
            self.probs = get(query, key, mask)
            return self.probs

        attn.get_attention_scores = record
        try:
            return super().__call__(attn, hidden_states, *args, **kwargs)
        finally:
            del attn.get_attention_scores


def blur(x, kernel_size=9, sigma=1.0):
    """The paper's (and diffusers') Gaussian blur of x0, reflect padded."""
    half = (kernel_size - 1) * 0.5
    pdf = torch.exp(-0.5 * (torch.linspace(-half, half, kernel_size) / sigma).pow(2))
    k = pdf / pdf.sum()
    k2 = (k[:, None] @ k[None, :]).expand(x.shape[1], 1, kernel_size, kernel_size).to(x)
    return F.conv2d(F.pad(x, [kernel_size // 2] * 4, mode="reflect"), k2, groups=x.shape[1])


def degraded(x0, eps, mask, abar):
    """sqrt(abar) * (x0 blurred under the mask) + sqrt(1 - abar) * eps."""
    m = F.interpolate(mask[:, None].float(), size=x0.shape[-2:], mode="nearest")
    x0d = blur(x0) * m + x0 * (1 - m)
    return abar.sqrt() * x0d + (1 - abar).sqrt() * eps


def reference_latents(latents, refresh, batched, sag_scale=SAG_SCALE):
    """The final latents of CFG + SAG with `refresh` on the tiny SD UNet, by the formulas."""
    pipe = sd_pipeline()
    unet, scheduler = pipe.unet, pipe.scheduler
    store = StoreProbs()
    unet.mid_block.attentions[0].transformer_blocks[0].attn1.set_processor(store)
    heads = unet.mid_block.attentions[0].transformer_blocks[0].attn1.heads
    b = latents.shape[0]
    pe, ne = prompt_embeds(b)
    scheduler.set_timesteps(STEPS)
    latents = latents * scheduler.init_noise_sigma
    d = previous = None
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.scale_model_input(latents, t)
            o = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([ne, pe]), return_dict=False)[0]
            u, c = o[:b], o[b:]
            probs = store.probs.reshape(2 * b, heads, *store.probs.shape[-2:])[:b]
            mass = probs.mean(1).sum(1)  # the attention each key receives
            side = int(mass.shape[-1] ** 0.5)
            mask = (mass > 1.0).reshape(b, side, side)
            abar = scheduler.alphas_cumprod[int(t)]
            if i % refresh == 0:  # the step's degraded rows
                if batched and previous is not None:
                    eps_prev, mask_prev = previous
                    x0_prev = (x - (1 - abar).sqrt() * eps_prev) / abar.sqrt()
                    xd = degraded(x0_prev, eps_prev, mask_prev, abar)
                else:
                    xd = degraded((x - (1 - abar).sqrt() * u) / abar.sqrt(), u, mask, abar)
                deg = unet(xd, t, encoder_hidden_states=ne, return_dict=False)[0]
                d = u - deg
            previous = (u, mask)
            pred = u + GUIDANCE * (c - u) + sag_scale * d
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return latents


def batch_sizes(pipe, steps, n=1):
    sizes = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(args[0].shape[0]), with_kwargs=True)
    pe, ne = prompt_embeds(n)
    try:
        with torch.no_grad():
            pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=steps, output_type="latent", height=SIZE, width=SIZE)
    finally:
        handle.remove()
    return sizes


@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_sag_refresh_runs_degraded_rows_every_other_step(mode):
    pipe = sagfast.enable(sd_pipeline(), scale=SAG_SCALE, sag_refresh=2, mode=mode)
    sizes = batch_sizes(pipe, 6)
    # exact: 2B then B at steps 0, 2, 4; batched: the first step exact, then one call of 3B; 2B between.
    want = [2, 1, 2, 2, 1, 2, 2, 1, 2] if mode == "exact" else [2, 1, 2, 3, 2, 3, 2]
    assert sizes == want


@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_sag_refresh_equals_the_reference_loop(mode):
    x = start_latents(2)
    ref = reference_latents(x, refresh=2, batched=mode == "batched")
    got = sagfast_latents(x, scale=SAG_SCALE, sag_refresh=2, mode=mode)
    every = sagfast_latents(x, scale=SAG_SCALE, mode=mode)
    bound = 1e-4 * ref.abs().max().item()
    diff = (got - ref).abs().max().item()
    effect = (every - ref).abs().max().item()
    print(f"{mode}: max |sagfast - ref| {diff:.2e}, bound {bound:.2e}, max |refresh 1 - ref| {effect:.2e}")
    assert diff <= bound
    assert effect > 100 * bound
    # The reference with refresh 1 is SAG as sagfast runs it every step (the reference itself is right).
    assert (reference_latents(x, refresh=1, batched=mode == "batched") - every).abs().max().item() <= bound


@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_sag_refresh_one_is_the_default_bitwise(mode):
    x = start_latents()
    assert torch.equal(sagfast_latents(x, scale=SAG_SCALE, sag_refresh=1, mode=mode), sagfast_latents(x, scale=SAG_SCALE, mode=mode))


def test_pag_refresh_runs_perturbed_rows_every_third_step():
    pipe = sagfast.enable(sd_pipeline(), scale=0.0, pag_scale=3.0, pag_refresh=3)
    assert batch_sizes(pipe, 7) == [3, 2, 2, 3, 2, 2, 3]


def pag_latents(latents, pe, ne, **config):
    pipe = sagfast.enable(sd_pipeline(), scale=0.0, **config)
    with torch.no_grad():
        out = pipe(
            prompt_embeds=pe,
            negative_prompt_embeds=ne,
            latents=latents.clone(),
            num_inference_steps=7,
            guidance_scale=GUIDANCE,
            height=SIZE,
            width=SIZE,
            output_type="latent",
        )
    return out.images


def test_per_image_pag_scale_with_refresh_equals_each_image_alone():
    x = start_latents(2)
    pe, ne = prompt_embeds(2)
    mixed = pag_latents(x, pe, ne, pag_scale=[0.0, 3.0], pag_refresh=3)
    for i, s in enumerate((0.0, 3.0)):
        one = slice(i, i + 1)
        alone = pag_latents(x[one], pe[one], ne[one], pag_scale=s, pag_refresh=3)
        diff = (mixed[one] - alone).abs().max().item()
        print(f"image {i} (pag_scale {s}): max |mixed - alone| {diff:.2e}")
        assert diff <= 1e-4 * max(1.0, alone.abs().max().item())
    every = pag_latents(x, pe, ne, pag_scale=[0.0, 3.0])
    # Scale 0: the reused difference adds 0 (the calls' batch sizes differ: float reorderings only).
    assert (mixed[0] - every[0]).abs().max().item() <= 1e-4 * max(1.0, every.abs().max().item())
    assert (mixed[1] - every[1]).abs().max() > 1e-2  # refresh changed image 1


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
@pytest.mark.parametrize("field", ["sag_refresh", "pag_refresh", "seg_refresh", "stg_refresh", "tpg_refresh"])
def test_bad_refresh_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SAGConfig(**{field: value})
    pipe = sd_pipeline()
    with pytest.raises(ValueError, match=field):
        sagfast.enable(pipe, **{field: value})


def test_the_modular_guider_refuses_term_refresh():
    from sagfast.guiders import Guidance

    with pytest.raises(ValueError, match="pag_refresh"):
        Guidance(guidance_scale=5.0, scale=0.0, pag_scale=3.0, pag_refresh=2)
    Guidance(guidance_scale=5.0, scale=0.0, pag_scale=3.0, pag_refresh=1)
