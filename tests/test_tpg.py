"""Token Perturbation Guidance (sagfast/terms/tpg.py) against a reference written here, independently of
sagfast: a denoising loop that runs the model on [uncond, cond], then on the cond rows with a forward
pre-hook on the chosen block that permutes its `hidden_states` along the token axis by
`torch.randperm(n, generator=torch.Generator().manual_seed(tpg_seed + i))` at step i, and combines
`cfg + tpg_scale * (o_c - o_tpg)` itself. Final latents agree within 1e-4 * max |ref|, and TPG moves the
reference by more than 100x that from plain CFG, so a parity that holds because nothing happened
cannot pass. On the tiny SD UNet (DDIM, and Heun, whose two evaluations of a step are that step) and
on the trained digit DiT (flow matching).
"""

from __future__ import annotations

import pytest
import torch
from components import prompt_embeds, sd_pipeline
from diffusers import HeunDiscreteScheduler
from test_terms import batch_sizes, one_row, sd_inputs

import sagfast
from sagfast.digits import load_dit_pipeline

STEPS = 4
G = 5.0
MID = "mid_block.attentions.0.transformer_blocks.0"  # what "mid" is on SD 1.x's UNet: its mid block's only block


def permuting(seed: int):
    """A forward pre-hook that permutes a block's `hidden_states` [B, n, C] along n by randperm(n, seed)."""

    def hook(module, args, kwargs):
        if "hidden_states" in kwargs:
            h = kwargs["hidden_states"]
            return args, dict(kwargs, hidden_states=h[:, torch.randperm(h.shape[1], generator=torch.Generator().manual_seed(seed))])
        h = args[0]
        return (h[:, torch.randperm(h.shape[1], generator=torch.Generator().manual_seed(seed))], *args[1:]), kwargs

    return hook


def sd_reference(latents, s, blocks, seed=0, scheduler_cls=None, same_every_step=False):
    """The final latents of CFG (scale G) + TPG (scale s) on the tiny SD UNet; `same_every_step`: the
    permutation of step 0 at every step (what TPG is not)."""
    pipe = sd_pipeline(**({"scheduler_cls": scheduler_cls} if scheduler_cls else {}))
    unet, scheduler = pipe.unet, pipe.scheduler
    modules = dict(unet.named_modules())
    pe, ne = prompt_embeds(latents.shape[0])
    scheduler.set_timesteps(STEPS)
    latents = latents * scheduler.init_noise_sigma
    scale = torch.tensor(s, dtype=torch.float32).view(-1, 1, 1, 1)
    with torch.no_grad():
        for j, t in enumerate(scheduler.timesteps):
            i = 0 if same_every_step else j // scheduler.order  # a Heun step's two evaluations are step i
            x = scheduler.scale_model_input(latents, t)
            o_u, o_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([ne, pe]), return_dict=False)[0].chunk(2)
            handles = [modules[b].register_forward_pre_hook(permuting(seed + i), with_kwargs=True) for b in blocks]
            try:
                o_tpg = unet(x, t, encoder_hidden_states=pe, return_dict=False)[0]
            finally:
                for h in handles:
                    h.remove()
            pred = o_u + G * (o_c - o_u) + scale * (o_c - o_tpg)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return latents


def sd_sagfast(latents, scheduler_cls=None, **config):
    pipe = sagfast.enable(sd_pipeline(**({"scheduler_cls": scheduler_cls} if scheduler_cls else {})), **{"scale": 0.0, **config})
    pe, ne = prompt_embeds(latents.shape[0])
    return pipe(
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        latents=latents.clone(),
        num_inference_steps=STEPS,
        guidance_scale=G,
        height=32,
        width=32,
        output_type="latent",
    ).images


def start(n=1):
    return torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(5))


SD_CASES = {
    "mid": (dict(tpg_layers="mid"), [MID], 0, None),
    "down-block-seed-7": (
        dict(tpg_layers="down_blocks.1.attentions.0.transformer_blocks.0", tpg_seed=7),
        ["down_blocks.1.attentions.0.transformer_blocks.0"],
        7,
        None,
    ),
    "two-blocks": (
        dict(tpg_layers=["mid", "up_blocks.0.attentions.1.transformer_blocks.0"]),
        [MID, "up_blocks.0.attentions.1.transformer_blocks.0"],
        0,
        None,
    ),
    "heun": (dict(tpg_layers="mid", tpg_seed=3), [MID], 3, HeunDiscreteScheduler),
}


@pytest.mark.parametrize("mode", ["exact", "batched"])
@pytest.mark.parametrize("case", list(SD_CASES))
def test_tpg_on_a_unet_equals_the_reference_loop(case, mode):
    config, blocks, seed, scheduler_cls = SD_CASES[case]
    x = start()
    want = sd_reference(x, 3.0, blocks, seed, scheduler_cls)
    plain = sd_reference(x, 0.0, blocks, seed, scheduler_cls)
    got = sd_sagfast(x, scheduler_cls, mode=mode, tpg_scale=3.0, **config)
    bound = 1e-4 * want.abs().max().item()
    assert (got - want).abs().max().item() <= bound
    assert (want - plain).abs().max().item() > 100 * bound  # TPG moved the latents: the parity is not vacuous


def test_each_step_has_its_own_permutation():
    """One permutation for the whole call (seed 0 at every step) is measurably not what TPG does."""
    x = start()
    fixed = sd_reference(x, 3.0, [MID], 0, same_every_step=True)
    assert (sd_sagfast(x, tpg_scale=3.0) - fixed).abs().max().item() > 100 * 1e-4 * fixed.abs().max().item()


def test_per_image_tpg_scale_in_one_call_equals_each_image_alone():
    make, call, latents = sd_inputs(3)
    scales = [0.0, 2.0, 5.0]
    pipe = sagfast.enable(make(), scale=0.0, tpg_scale=scales, mode="batched")
    mixed = pipe(**call, latents=latents, guidance_scale=G, num_inference_steps=3, output_type="latent").images
    for i in range(3):
        sagfast.enable(pipe, scale=0.0, tpg_scale=scales[i], mode="batched")
        alone = pipe(**one_row(call, i), latents=latents[i : i + 1], guidance_scale=G, num_inference_steps=3, output_type="latent").images
        assert (mixed[i : i + 1] - alone).abs().max().item() <= 1e-4 * alone.abs().max().item(), f"image {i}"
    sagfast.disable(pipe)
    plain = pipe(**call, latents=latents, guidance_scale=G, num_inference_steps=3, output_type="latent").images
    assert (mixed[0] - plain[0]).abs().max() <= 1e-4 * plain[0].abs().max()  # tpg_scale 0 is plain CFG
    assert (mixed[2] - plain[2]).abs().max() > 0.01  # TPG changed the image with scale 5


# --- The digit DiT (flow matching, trained) -----------------------------------------------------------


def dit_reference(pipe, labels, latents, s, blocks, seed=0, g=3.0, steps=STEPS):
    """The digit DiT pipeline's loop (null class first under CFG) with TPG's rows and combine added."""
    model, scheduler = pipe.transformer, pipe.scheduler
    modules = dict(model.named_modules())
    labels = torch.tensor(labels)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            b = latents.shape[0]
            v = model(
                torch.cat([latents, latents]), timestep=t.expand(2 * b), class_labels=torch.cat([torch.full_like(labels, 10), labels])
            ).sample
            u, c = v.chunk(2)
            handles = [modules[name].register_forward_pre_hook(permuting(seed + i), with_kwargs=True) for name in blocks]
            try:
                o_tpg = model(latents, timestep=t.expand(b), class_labels=labels).sample
            finally:
                for h in handles:
                    h.remove()
            latents = scheduler.step(u + g * (c - u) + s * (c - o_tpg), t, latents).prev_sample
    return latents


@pytest.mark.parametrize("layers, blocks", [("mid", ["transformer_blocks.2"]), ("transformer_blocks.0", ["transformer_blocks.0"])])
def test_tpg_on_the_digit_dit_equals_the_reference_loop(layers, blocks):
    pipe = load_dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    labels = [3, 8]
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    want = dit_reference(pipe, labels, x.clone(), 2.0, blocks, seed=11)
    plain = dit_reference(pipe, labels, x.clone(), 0.0, blocks, seed=11)
    sagfast.enable(pipe, scale=0.0, tpg_scale=2.0, tpg_layers=layers, tpg_seed=11, mode="batched")
    got = pipe(labels, num_inference_steps=STEPS, guidance_scale=3.0, latents=x.clone(), output_type="latent").images
    bound = 1e-4 * want.abs().max().item()
    assert (got - want).abs().max().item() <= bound
    assert (want - plain).abs().max().item() > 100 * bound


# --- Rows per call, errors, disable ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, sizes",
    [
        (dict(scale=0.0, tpg_scale=2.0), [3, 3, 3]),
        (dict(scale=0.75, pag_scale=2.0, tpg_scale=2.0, mode="exact"), [4, 1] * 3),
        # After the first (exact) step, one call per step: [u, c, deg, ptb, tpg].
        (dict(scale=0.75, pag_scale=2.0, tpg_scale=2.0, mode="batched"), [4, 1, 5, 5]),
        (dict(scale=0.0, tpg_scale=2.0, tpg_interval=(0.5, 1.0)), [2, 2, 3, 3]),
    ],
    ids=["tpg", "sag+pag+tpg-exact", "sag+pag+tpg-batched", "tpg-interval"],
)
def test_rows_per_model_call(config, sizes):
    pipe = sagfast.enable(sd_pipeline(), **config)
    pe, ne = prompt_embeds(1)
    steps = 4 if "tpg_interval" in config else 3
    got = batch_sizes(
        pipe, prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=steps, output_type="latent", height=32, width=32
    )
    assert got == sizes


def hooks(model) -> dict:
    return {name: (list(m._forward_pre_hooks.values()), list(m._forward_hooks.values())) for name, m in model.named_modules()}


@pytest.mark.parametrize(
    "config, message",
    [
        (
            dict(tpg_layers="mid_block.attentions.0"),
            r"tpg_layers entry 'mid_block\.attentions\.0' is not a transformer block of this UNet2DConditionModel: give 'mid' or a "
            r"block's full name\. Its transformer blocks: 'down_blocks\.1\.attentions\.0\.transformer_blocks\.0', "
            r"'mid_block\.attentions\.0\.transformer_blocks\.0', 'up_blocks\.0\.attentions\.0\.transformer_blocks\.0', "
            r"'up_blocks\.0\.attentions\.1\.transformer_blocks\.0'$",
        ),
        (dict(tpg_layers=[]), r"tpg_layers must be a non-empty string or list of strings"),
        (dict(tpg_seed=-1), r"tpg_seed must be an int with 0 <= seed < 2\*\*63, got -1"),
        (dict(tpg_seed=2**63), r"tpg_seed must be an int with 0 <= seed < 2\*\*63"),
        (dict(tpg_seed=True), r"tpg_seed must be an int"),
        (dict(tpg_scale=-1.0), r"tpg_scale must be >= 0"),
    ],
    ids=["not-a-block", "no-layers", "negative-seed", "seed-too-large", "bool-seed", "negative-scale"],
)
def test_bad_tpg_settings_are_refused_and_the_pipeline_is_left_as_it_was(config, message):
    pipe = sd_pipeline()
    before, cls = hooks(pipe.unet), type(pipe)
    with pytest.raises(ValueError, match=message):
        sagfast.enable(pipe, **{"tpg_scale": 1.0, **config})
    assert type(pipe) is cls and hooks(pipe.unet) == before


def test_disable_leaves_the_models_hooks_and_processors_as_before():
    pipe = sd_pipeline()
    before = hooks(pipe.unet)
    processors = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    sagfast.enable(pipe, scale=0.75, tpg_scale=2.0, tpg_layers=["mid", "up_blocks.0.attentions.0.transformer_blocks.0"])
    pe, ne = prompt_embeds(1)
    pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=2, output_type="latent", height=32, width=32)
    assert hooks(pipe.unet) != before  # the block hooks were there while enabled
    sagfast.disable(pipe)
    assert hooks(pipe.unet) == before
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == processors
