"""How far fp16/bf16 SAG lands from fp32 SAG: sagfast against diffusers' own SAG pipeline.

sagfast computes the attention mass, the mask and the blur in fp32 whatever the model dtype; diffusers
computes the attention map, its mean and the threshold in the model dtype. On the same tiny random SD
components (fp32 weights cast down), per scheduler and prediction type, with the same noise:

- `plain`: d(CFG only in half, CFG only in fp32), the model's own rounding, no SAG;
- `diffusers`: d(diffusers SAG in half, diffusers SAG in fp32);
- `sagfast`: d(sagfast SAG in half, diffusers SAG in fp32);
- `effect`: d(diffusers SAG in fp32, CFG only in fp32), what SAG changes;

d is the RMS over latent elements, averaged over images; the max abs difference is in the JSON.

    python -m bench.half_precision [--device cpu|cuda] [--steps 10] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
    StableDiffusionSAGPipeline as DiffusersSAG,
)

import sagfast
from bench.common import save_report
from bench.models import TINY, components, prompt_kwargs

SCHEDULERS = {"DDIM": DDIMScheduler, "DPM++ 2M": DPMSolverMultistepScheduler}


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).flatten(1).mean(1).sqrt().mean().item()


def _pipes(scheduler_cls, prediction_type: str, device, dtype):
    comps = components(TINY, device, dtype)
    comps["scheduler"] = scheduler_cls.from_config(comps["scheduler"].config, prediction_type=prediction_type)
    plain, ref = StableDiffusionPipeline(**comps), DiffusersSAG(**comps)
    ours = sagfast.StableDiffusionSAGPipeline(**comps)
    for p in (plain, ref, ours):
        p.set_progress_bar_config(disable=True)
    return plain, ref, ours


def run(device: torch.device, steps: int = 10, batch: int = 2, size=(64, 48), sag_scale: float = 0.75) -> dict:
    rows = []
    for sched_name, sched_cls in SCHEDULERS.items():
        for prediction_type in ("epsilon", "v_prediction"):
            outs = {}
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                plain, ref, ours = _pipes(sched_cls, prediction_type, device, dtype)
                kw = dict(
                    prompt_kwargs(TINY, device, dtype, batch),
                    height=size[0],
                    width=size[1],
                    num_inference_steps=steps,
                    guidance_scale=7.5,
                    output_type="latent",
                )
                go = lambda pipe, **extra: pipe(generator=torch.Generator().manual_seed(0), **kw, **extra).images.float()  # noqa: E731
                outs[dtype] = dict(plain=go(plain), diffusers=go(ref, sag_scale=sag_scale), sagfast=go(ours, sag_scale=sag_scale))
            full = outs[torch.float32]
            for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
                half = outs[dtype]
                rows.append(
                    dict(
                        scheduler=sched_name,
                        prediction=prediction_type,
                        dtype=name,
                        effect=rms(full["diffusers"], full["plain"]),
                        plain=rms(half["plain"], full["plain"]),
                        diffusers=rms(half["diffusers"], full["diffusers"]),
                        sagfast=rms(half["sagfast"], full["diffusers"]),
                        max_diffusers=(half["diffusers"] - full["diffusers"]).abs().max().item(),
                        max_sagfast=(half["sagfast"] - full["diffusers"]).abs().max().item(),
                        fp32_sagfast_vs_diffusers=(full["sagfast"] - full["diffusers"]).abs().max().item(),
                    )
                )
    return dict(device=str(device), steps=steps, batch=batch, size=list(size), sag_scale=sag_scale, rows=rows)


def table(result: dict) -> str:
    lines = [
        f"tiny random SD components on {result['device']}, {result['batch']} images {result['size'][0]}x{result['size'][1]}, "
        f"{result['steps']} steps, CFG 7.5, SAG {result['sag_scale']}; RMS distances to the fp32 run",
        "",
        "| scheduler | prediction | dtype | SAG effect (fp32) | plain: half vs fp32 | diffusers SAG: half vs fp32 | sagfast SAG half vs diffusers fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['scheduler']} | {r['prediction']} | {r['dtype']} | {r['effect']:.4f} | {r['plain']:.4f} | "
            f"{r['diffusers']:.4f} | {r['sagfast']:.4f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("out/half_precision"))
    args = parser.parse_args(argv)
    result = run(torch.device(args.device), args.steps)
    save_report(args.out, "half_precision", result, table(result))


if __name__ == "__main__":
    main()
