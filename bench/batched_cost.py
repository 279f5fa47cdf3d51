"""What batched SAG costs in quality: its distance to exact SAG, against SAG's own effect.

On the embedded digit model (trained on real MNIST digits), per scheduler, the same initial noise and
labels run with CFG only, CFG + exact SAG and CFG + batched SAG. Reported per scheduler:
`d(exact, none)` (what SAG changes), `d(batched, exact)` (what batching changes) and their ratio,
with d the RMS over pixels in [-1, 1] averaged over samples; and the shipped classifier's accuracy on
the requested digit for each variant.

    python -m bench.batched_cost [--n 100] [--steps 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

import sagfast
from bench.common import save_report

SCHEDULERS = {
    "DDIM": lambda c: DDIMScheduler.from_config(c),
    "DPM++ 2M": lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="dpmsolver++"),
    "UniPC": lambda c: UniPCMultistepScheduler.from_config(c),
    "Euler": lambda c: EulerDiscreteScheduler.from_config(c),
    "Heun": lambda c: HeunDiscreteScheduler.from_config(c),
}


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).flatten(1).mean(1).sqrt().mean().item()


def run(n: int = 100, steps: int = 20, guidance_scale: float = 3.0, sag_scale: float = 0.75) -> dict:
    from sagfast.digits import load_classifier, load_pipeline

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier()
    base_config = pipe.scheduler.config
    labels = torch.arange(n) % 10
    noise = torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    rows = []
    for name, make in SCHEDULERS.items():
        pipe.scheduler = make(base_config)
        outs, secs = {}, {}
        for variant, overrides in (("none", dict(scale=0.0)), ("exact", dict(mode="exact")), ("batched", dict(mode="batched"))):
            sagfast.enable(pipe, **{"scale": sag_scale, **overrides})
            t0 = time.perf_counter()
            outs[variant] = pipe(
                class_labels=labels,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                latents=noise.clone(),
                generator=torch.Generator().manual_seed(1),
                output_type="latent",
            ).images
            secs[variant] = time.perf_counter() - t0
            sagfast.disable(pipe)
        acc = {}
        with torch.no_grad():
            for variant, x in outs.items():
                acc[variant] = (classifier(x.float()).argmax(1) == labels).float().mean().item()
        d_sag, d_batch = rms(outs["exact"], outs["none"]), rms(outs["batched"], outs["exact"])
        rows.append(
            dict(
                scheduler=name,
                d_exact_none=d_sag,
                d_batched_exact=d_batch,
                ratio=d_batch / d_sag,
                d_batched_none=rms(outs["batched"], outs["none"]),
                acc_none=acc["none"],
                acc_exact=acc["exact"],
                acc_batched=acc["batched"],
                s_none=secs["none"],
                s_exact=secs["exact"],
                s_batched=secs["batched"],
            )
        )
    return dict(n=n, steps=steps, guidance_scale=guidance_scale, sag_scale=sag_scale, rows=rows)


def table(result: dict) -> str:
    lines = [
        f"N={result['n']} samples, {result['steps']} steps, CFG {result['guidance_scale']}, SAG scale {result['sag_scale']}",
        "",
        "| scheduler | d(exact, none) | d(batched, exact) | ratio | d(batched, none) | acc none | acc exact | acc batched | s none / exact / batched |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['scheduler']} | {r['d_exact_none']:.4f} | {r['d_batched_exact']:.4f} | {r['ratio']:.2f} | "
            f"{r['d_batched_none']:.4f} | {r['acc_none']:.3f} | {r['acc_exact']:.3f} | {r['acc_batched']:.3f} | "
            f"{r['s_none']:.1f} / {r['s_exact']:.1f} / {r['s_batched']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("out/batched_cost"))
    args = parser.parse_args(argv)
    result = run(args.n, args.steps)
    save_report(args.out, "batched_cost", result, table(result))


if __name__ == "__main__":
    main()
