"""Scenario "e2e": whole-pipeline wall time per mode.

1. The embedded digit model (`sagfast.digits`, trained weights shipped with the package): one pipeline
   call generating the ten digits 0-9 (batch 10) with CFG, per mode: plain CFG, sagfast exact,
   sagfast batched, and with CUDA graphs on a GPU. Where the weights do not load, the row is an error
   with the reason (the scenario then exits non-zero).
2. On a GPU only: the SD 1.5-shaped UNet (random weights) with the SD VAE's shape, 512x512, 30 steps,
   batch 1, output_type="pt" (VAE decode included), per mode: CFG, diffusers' SAG pipeline, sagfast
   exact / batched / + CUDA graph, diffusers' PAG (mid). Not run on CPU (a 30-step SD 1.5 call at 512
   takes minutes per mode on 2 cores); the row says so.

Each mode is a whole pipeline call, timed end to end (CUDA events + synchronize on GPU), the modes
interleaved over rounds after warm-up; "x CFG" is the median of the per-round ratios.
"""

from __future__ import annotations

import os

import torch

import sagfast
from bench import common, models, step
from sagfast.digits import load_pipeline


def _digits_call(steps: int, device) -> dict:
    """One call that generates the digits 0-9."""
    generator = torch.Generator(device=device).manual_seed(0)
    return dict(class_labels=list(range(10)), num_inference_steps=steps, guidance_scale=3.0, generator=generator, output_type="pt")


def _rows_from(samples: dict, skipped: dict, base: dict, labels: dict) -> list:
    rows = []
    cfg = samples.get("cfg") if isinstance(samples.get("cfg"), list) else None
    for key, label in labels.items():
        row, summ = common.variant_status(dict(base, mode=label, key=key), key, samples, skipped)
        if summ is None:
            rows.extend([row] if row is not None else [])
            continue
        s = samples[key]
        row.update(wall_ms=summ["median"], p25_ms=summ["p25"], p75_ms=summ["p75"], min_ms=summ["min"], rounds=summ["n"], status="ok")
        if cfg:
            row["x_cfg"] = common.paired_ratio(s, cfg)["median"]
        rows.append(row)
    return rows


def run_digits(opts, log) -> tuple[list, list]:
    device, dtype = opts.device, opts.dtype
    steps = opts.steps or (10 if opts.quick else 25)
    rounds = opts.rounds or (3 if opts.quick else 5)
    warmup = opts.warmup if opts.warmup is not None else 1
    base = {"model": "digits (embedded)", "image": "32x32", "batch": 10, "steps": steps}

    def factory():
        return load_pipeline(device=device, dtype=dtype, progress=False)

    try:
        pipes = {"cfg": factory()}
    except Exception as exc:  # a row that failed, with its reason: the scenario exits non-zero
        return [dict(base, mode="all", status=f"error: the digit pipeline does not load ({type(exc).__name__}: {exc})")], []
    labels = {
        "cfg": "CFG only (no SAG)",
        "sagfast_exact": "sagfast exact",
        "sagfast_batched": "sagfast batched",
        "sagfast_exact_graph": "sagfast exact + CUDA graph",
        "sagfast_batched_graph": "sagfast batched + CUDA graph",
    }
    modes = {"sagfast_exact": dict(mode="exact"), "sagfast_batched": dict(mode="batched")}
    skipped = {}
    gok, gwhy = step.graph_supported(device)
    for name, cfg in list(modes.items()):
        if gok:
            modes[name + "_graph"] = dict(cfg, cuda_graph=True)
        else:
            skipped[name + "_graph"] = gwhy
    runners = {}
    for name, cfg in modes.items():
        pipes[name] = sagfast.enable(factory(), scale=0.75, **cfg)
    for name, pipe in pipes.items():

        def fn(pipe=pipe):
            with torch.inference_mode():
                pipe(**_digits_call(steps, device))

        runners[name] = common.timed(fn, device, number=1)
    log(f"e2e: digits, {steps} steps, batch 10, {rounds} rounds: {list(runners)}")
    samples = common.interleave(runners, rounds, warmup, log)
    weights = os.environ.get("SAGFAST_DIGITS_WEIGHTS") or "the shipped weights (sagfast/weights)"
    notes = [
        f"digits: weights from {weights}; guidance 3.0, SAG scale 0.75, the pipeline's default scheduler (DDIM); "
        "diffusers' SAG and PAG pipelines are SD-only, so they have no digit-model row."
    ]
    return _rows_from(samples, skipped, base, labels), notes


def run_sd15(opts, log) -> tuple[list, list]:
    device, dtype = opts.device, opts.dtype
    size = opts.size or 512
    steps = opts.steps or 30
    base = {"model": "sd15", "image": f"{size}x{size}", "batch": 1, "steps": steps}
    if device.type != "cuda":
        return [
            dict(
                base, mode="all", status="skipped: needs a CUDA device (a 30-step SD 1.5 call at 512 takes minutes per mode on 2 CPU cores)"
            )
        ], []
    rounds = opts.rounds or 3
    warmup = opts.warmup if opts.warmup is not None else 1
    runners, skipped, _ = step.build_variants(models.SD15, size, steps, device, dtype, opts.variants, log, vae="sd")
    runners.pop("floor", None)
    timed = {}
    for name, r in runners.items():

        def fn(r=r):
            with torch.inference_mode():
                r.pipe(
                    num_inference_steps=steps,
                    output_type="pt",
                    generator=torch.Generator(device=device).manual_seed(0),
                    **r.kwargs,
                )

        timed[name] = common.timed(fn, device, number=1)
    log(f"e2e: sd15 {size}x{size}, {steps} steps, {rounds} rounds: {list(timed)}")
    samples = common.interleave(timed, rounds, warmup, log)
    labels = {k: v for k, v in step.LABELS.items() if k != "floor"}
    return _rows_from(samples, skipped, base, labels), []


def run(opts, record: dict, log=common.log) -> dict:
    rows, notes = [], []
    wanted = opts.models or ["digits", "sd15"]
    if "digits" in wanted or "tiny" in wanted:
        r, n = run_digits(opts, log)
        rows += r
        notes += n
    if "sd15" in wanted:
        r, n = run_sd15(opts, log)
        rows += r
        notes += n
    notes += [
        "wall ms: median over interleaved rounds of one whole pipeline call (decode included); x CFG: median of "
        "per-round ratios to the CFG-only call of the same run.",
    ]
    return {
        "title": "End to end: whole pipeline wall time per mode",
        "rows": rows,
        "notes": notes,
        "columns": [
            ("model", "model"),
            ("image", "image"),
            ("batch", "batch"),
            ("steps", "steps"),
            ("mode", "mode"),
            ("wall_ms", "wall ms (median)"),
            ("p25_ms", "p25"),
            ("p75_ms", "p75"),
            ("x_cfg", "x CFG"),
            ("status", "status"),
        ],
    }
