"""Scenario "video": time per denoising step of Wan's guidance variants, sagfast against the plain pipeline.

WanPipeline runs CFG as two transformer calls per step (cond, then uncond); sagfast joins them into
one [uncond, cond] call (docs/design.md, "CFG as two calls"), so each variant's rows per step are:

  (a) cfg                  the plain WanPipeline: B, then B
  (b) cfg_joined           sagfast's own CFG (cfg_scale = the call's guidance scale): one call of 2B
  (c) sag_exact            SAG exact: 2B, then B
  (d) sag_batched          SAG batched: 3B
  (e) pag                  PAG on the middle block's attn1: 3B
  (f) stg_block            STG-R, the middle block skipped: 3B
  (g) stg_attention        STG-A, the middle block's attention skipped: 3B
  (h) sag_pag_stg_batched  SAG + PAG + STG batched: 5B

Models (random weights, built from configs, no download), each at 17 frames:
  wan_tiny   3 blocks of 2 heads x 8, 64x80 pixels: map 5 x 4 x 5 = 100 tokens (launch bound)
  wan_small  8 blocks of 4 heads x 32, 128x160 pixels: map 5 x 8 x 10 = 400 tokens

Method: as `bench step` (bench.step.PipelineRunner): each variant runs the pipeline for `steps`
steps with output_type="latent"; a step-end callback marks the time; the step time is the mean of
steps 2..n. Variants are interleaved over rounds after warm-up; x CFG is the median of the per-round
ratios to (a) in the same run.
"""

from __future__ import annotations

import re

import torch

import sagfast
from bench import common
from bench.step import PipelineRunner

MODELS = {
    "wan_tiny": dict(layers=3, heads=2, head_dim=8, height=64, width=80),
    "wan_small": dict(layers=8, heads=4, head_dim=32, height=128, width=160),
}
FRAMES = 17
GUIDANCE = 5.0

VARIANTS = {
    "cfg": ("(a) CFG: plain WanPipeline, [c] + [u]", None),
    "cfg_joined": ("(b) CFG joined by sagfast: [u, c]", dict(scale=0.0, cfg_scale=GUIDANCE)),
    "sag_exact": ("(c) SAG exact: [u, c] + [deg]", dict(mode="exact")),
    "sag_batched": ("(d) SAG batched: [u, c, deg]", dict(mode="batched")),
    "pag": ("(e) PAG: [u, c, ptb]", dict(scale=0.0, pag_scale=1.0, pag_layers="mid_attn")),
    "stg_block": ("(f) STG-R, block skipped: [u, c, skip]", dict(scale=0.0, stg_scale=1.0)),
    "stg_attention": ("(g) STG-A, attention skipped: [u, c, skip]", dict(scale=0.0, stg_scale=1.0, stg_mode="attention")),
    "sag_pag_stg_batched": (
        "(h) SAG + PAG + STG batched: [u, c, ptb, skip, deg]",
        dict(mode="batched", pag_scale=1.0, pag_layers="mid_attn", stg_scale=1.0),
    ),
}
"""name -> (label, SAGConfig fields (SAG scale 0.75 unless given), or None for the plain pipeline)."""


def wan_pipeline(spec: dict, device, dtype, seed: int = 0):
    """A WanPipeline on a random WanTransformer3DModel of `spec`'s size (its tiny VAE is never run: the
    calls are output_type="latent")."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    dim = spec["heads"] * spec["head_dim"]
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=spec["heads"],
        attention_head_dim=spec["head_dim"],
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=2 * dim,
        num_layers=spec["layers"],
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    ).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae.eval(), transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def config_of(fields: dict, pipe) -> dict:
    """The variant's SAGConfig fields, "mid_attn" naming the middle block's attn1 (PAG's identifier)."""
    middle = re.escape(f"blocks.{len(pipe.transformer.blocks) // 2}.attn1")
    return {k: (f"^{middle}$" if v == "mid_attn" else v) for k, v in fields.items()}


def run(opts, record: dict, log=common.log) -> dict:
    device, dtype = opts.device, opts.dtype
    steps = opts.steps or (4 if opts.quick else 8)
    rounds = opts.rounds or (3 if opts.quick else 7)
    warmup = opts.warmup if opts.warmup is not None else 1
    names = opts.models or (["wan_tiny"] if opts.quick else list(MODELS))
    wanted = opts.variants or list(VARIANTS)
    rows = []
    for name in names:
        spec = MODELS[name]
        g = torch.Generator().manual_seed(1)
        text = [torch.randn(1, 8, 16, generator=g).to(device, dtype) for _ in range(2)]
        kwargs = dict(
            prompt_embeds=text[0],
            negative_prompt_embeds=text[1],
            height=spec["height"],
            width=spec["width"],
            num_frames=FRAMES,
            guidance_scale=GUIDANCE,
        )
        runners = {}
        for key in wanted:
            _, fields = VARIANTS[key]
            pipe = wan_pipeline(spec, device, dtype)
            if fields is not None:
                sagfast.enable(pipe, **config_of(fields, pipe))
            runners[key] = PipelineRunner(pipe, kwargs, steps, device, old_callback=False)
        log(f"video: {name}, {FRAMES} frames of {spec['height']}x{spec['width']}, {steps} steps, {rounds} rounds: {wanted}")
        samples = common.interleave(runners, rounds, warmup, log)
        base = samples.get("cfg") if isinstance(samples.get("cfg"), list) else None
        for key in wanted:
            row = {
                "model": name,
                "frames": FRAMES,
                "size": f"{spec['height']}x{spec['width']}",
                "steps": steps,
                "variant": VARIANTS[key][0],
            }
            row, summ = common.variant_status(row, key, samples, {})
            if summ is None:
                rows.extend([row] if row is not None else [])
                continue
            row.update(ms_per_step=summ["median"], p25_ms=summ["p25"], p75_ms=summ["p75"], rounds=summ["n"], status="ok")
            if base:
                row.update(x_cfg=common.paired_ratio(samples[key], base)["median"])
            rows.append(row)
    notes = [
        "ms/step: median over interleaved rounds of the mean steady-state step (steps 2..n of one pipeline call, "
        "output_type='latent'); x CFG: median of per-round ratios to (a) in the same run.",
        f"Random weights, UniPC (flow), guidance {GUIDANCE}, one video, dtype {str(dtype).replace('torch.', '')}.",
    ]
    return {
        "title": "Video step time per guidance variant (Wan)",
        "rows": rows,
        "notes": notes,
        "columns": [
            ("model", "model"),
            ("size", "size"),
            ("variant", "variant"),
            ("ms_per_step", "ms/step (median)"),
            ("p25_ms", "p25"),
            ("p75_ms", "p75"),
            ("x_cfg", "x CFG"),
            ("status", "status"),
        ],
    }
