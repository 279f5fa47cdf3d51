"""The `sagfast` command.

    sagfast demo [--out sag_demo.png] [--steps 20]
        The embedded digit model: a labelled PNG grid, rows the digits 0-9, columns no guidance, CFG,
        CFG + SAG (exact) and CFG + SAG (batched). Every column starts from the same noise; the time of
        each column is printed.

    sagfast demo --model DIR --prompt "a photo of a cat" [--prompt ...]
        The same with a local diffusers Stable Diffusion folder (SD 1.x / 2.x / XL, local files only):
        rows the prompts, columns CFG, CFG + SAG (exact) and CFG + SAG (batched).

Grid geometry (digit demo): each cell is `--samples` digits side by side, each 32x32 upscaled by 3
(96 px), 4 px gaps, a 36 px label column on the left and a 40 px header (two-line column titles).
So the PNG is `36 + columns * (samples * 96 + 4)` by `40 + 10 * (96 + 4)` pixels: 436 x 1040 for the
4 columns and 1 sample.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

DIGIT_ZOOM = 3
GAP = 4
LEFT = 36
TOP = 40


def digit_grid_size(columns: int, samples: int = 1) -> tuple[int, int]:
    """(width, height) of the digit demo's PNG."""
    cell = 32 * DIGIT_ZOOM
    return LEFT + columns * (samples * cell + GAP), TOP + 10 * (cell + GAP)


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _grid(columns: list[tuple[str, list]], row_labels: list[str], cell_w: int, cell_h: int, left: int = LEFT):
    """Paste `columns` [(title, [row image, ...])] into one labelled RGB image."""
    from PIL import Image, ImageDraw

    width = left + len(columns) * (cell_w + GAP)
    height = TOP + len(row_labels) * (cell_h + GAP)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for c, (title, images) in enumerate(columns):
        x = left + c * (cell_w + GAP)
        draw.multiline_text((x + 2, 4), title, fill="black", font=font, spacing=2)
        for r, img in enumerate(images):
            canvas.paste(img.convert("RGB"), (x, TOP + r * (cell_h + GAP)))
    for r, label in enumerate(row_labels):
        draw.text((4, TOP + r * (cell_h + GAP) + cell_h // 2 - 8), label, fill="black", font=font)
    return canvas


def _digit_columns(guidance: float, sag_scale: float):
    from sagfast.config import SAGConfig

    return [
        ("no\nguidance", 1.0, None),
        (f"CFG\ng={guidance:g}", guidance, None),
        (f"CFG+SAG\nexact {sag_scale:g}", guidance, SAGConfig(scale=sag_scale)),
        (f"CFG+SAG\nbatched {sag_scale:g}", guidance, SAGConfig(scale=sag_scale, mode="batched")),
    ]


def demo_digits(
    out: str,
    steps: int = 20,
    samples: int = 1,
    guidance: float = 3.0,
    sag_scale: float = 0.75,
    seed: int = 0,
    scheduler: str = "ddim",
    threads: int | None = None,
    log=print,
) -> dict:
    """Make the digit demo grid at `out`; returns {"path", "size", "columns": [{"title", "seconds"}]}."""
    from PIL import Image

    import sagfast
    from sagfast.digits import load_pipeline

    if threads:
        torch.set_num_threads(threads)
    pipe = load_pipeline(scheduler=_scheduler_class(scheduler), progress=False)
    labels = [d for d in range(10) for _ in range(samples)]
    noise = torch.randn(len(labels), 1, 32, 32, generator=torch.Generator().manual_seed(seed))
    cell = 32 * DIGIT_ZOOM
    columns, times = [], []
    for title, g, config in _digit_columns(guidance, sag_scale):
        if config is None:
            sagfast.disable(pipe)
        else:
            sagfast.enable(pipe, config)
        t0 = time.perf_counter()
        imgs = pipe(labels, num_inference_steps=steps, guidance_scale=g, latents=noise.clone(), output_type="pil").images
        dt = time.perf_counter() - t0
        name = title.replace("\n", " ")
        times.append({"title": name, "seconds": round(dt, 3)})
        log(f"{name:>22}: {dt:6.2f} s  ({len(labels)} digits, {steps} steps)")
        rows = []
        for d in range(10):
            row = Image.new("L", (samples * cell, cell), 255)
            for k in range(samples):
                row.paste(imgs[d * samples + k].resize((cell, cell), Image.NEAREST), (k * cell, 0))
            rows.append(row)
        columns.append((title, rows))
    sagfast.disable(pipe)
    grid = _grid(columns, [str(d) for d in range(10)], samples * cell, cell)
    grid.save(out)
    log(f"wrote {out} ({grid.width}x{grid.height})")
    return {"path": out, "size": grid.size, "columns": times}


def _scheduler_class(name: str):
    import diffusers

    names = {
        "ddim": "DDIMScheduler",
        "euler": "EulerDiscreteScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler",
        "dpm": "DPMSolverMultistepScheduler",
        "unipc": "UniPCMultistepScheduler",
        "pndm": "PNDMScheduler",
        "ddpm": "DDPMScheduler",
    }
    if name is None:
        return None
    return getattr(diffusers, names.get(name, name))


def demo_sd(
    model: str,
    prompts: list[str],
    out: str,
    steps: int = 25,
    guidance: float = 7.5,
    sag_scale: float = 0.75,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    scheduler: str | None = None,
    log=print,
) -> dict:
    """CFG vs CFG + SAG on a local Stable Diffusion folder; rows the prompts."""
    from diffusers import DiffusionPipeline

    import sagfast
    from sagfast.config import SAGConfig

    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    if scheduler:
        pipe.scheduler = _scheduler_class(scheduler).from_config(pipe.scheduler.config)
    pipe = pipe.to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    cols = [
        (f"CFG\ng={guidance:g}", None),
        (f"CFG+SAG\nexact {sag_scale:g}", SAGConfig(scale=sag_scale)),
        (f"CFG+SAG\nbatched {sag_scale:g}", SAGConfig(scale=sag_scale, mode="batched")),
    ]
    columns, times, size = [], [], None
    for title, config in cols:
        sagfast.enable(pipe, config) if config is not None else sagfast.disable(pipe)
        images = []
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            kw = dict(
                prompt=prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator(device="cpu").manual_seed(seed + i),
                height=height,
                width=width,
            )
            if negative_prompt:
                kw["negative_prompt"] = negative_prompt
            images.append(pipe(**kw).images[0])
        dt = time.perf_counter() - t0
        name = title.replace("\n", " ")
        times.append({"title": name, "seconds": round(dt, 3)})
        log(f"{name:>22}: {dt:7.2f} s  ({len(prompts)} images, {steps} steps)")
        size = images[0].size
        columns.append((title, images))
    sagfast.disable(pipe)
    labels = [str(i + 1) for i in range(len(prompts))]
    grid = _grid(columns, labels, size[0], size[1])
    grid.save(out)
    for i, p in enumerate(prompts):
        log(f"row {i + 1}: {p}")
    log(f"wrote {out} ({grid.width}x{grid.height})")
    return {"path": out, "size": grid.size, "columns": times}


def _demo(p, args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    elif (os.cpu_count() or 1) <= 2:
        # On a small shared machine two OpenMP threads spin-wait on each other while other processes
        # hold the cores: one thread is many times faster there.
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.model:
        if not args.prompt:
            p.error("--model needs at least one --prompt")
        demo_sd(
            args.model,
            args.prompt,
            args.out,
            steps=args.steps or 25,
            guidance=args.guidance or 7.5,
            sag_scale=args.sag_scale,
            seed=args.seed,
            height=args.height,
            width=args.width,
            negative_prompt=args.negative_prompt,
            scheduler=args.scheduler,
        )
    else:
        if args.prompt:
            p.error("--prompt needs --model DIR (the digit model takes no prompt)")
        demo_digits(
            args.out,
            steps=args.steps or 20,
            samples=args.samples,
            guidance=args.guidance or 3.0,
            sag_scale=args.sag_scale,
            seed=args.seed,
            scheduler=args.scheduler or "ddim",
        )
    print(f"total {time.perf_counter() - t0:.1f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sagfast", description="Self-Attention Guidance for diffusers, fast.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="a labelled PNG grid: no guidance / CFG / CFG + SAG",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--out", default="sag_demo.png", help="PNG path (default: sag_demo.png)")
    d.add_argument("--steps", type=int, help="denoising steps (default: 20 digits, 25 SD)")
    d.add_argument("--guidance", type=float, help="CFG scale (default: 3 digits, 7.5 SD)")
    d.add_argument("--sag-scale", type=float, default=0.75, help="SAG scale (default 0.75)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--samples", type=int, default=1, help="digit demo: samples per cell (default 1)")
    d.add_argument("--scheduler", help="ddim (default), euler, euler_a, dpm, unipc, pndm, ddpm, or a diffusers class name")
    d.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's; 1 on machines with <= 2 cores)")
    d.add_argument("--model", help="a local diffusers Stable Diffusion folder (instead of the digit model)")
    d.add_argument("--prompt", action="append", help="with --model: a prompt (repeat for more rows)")
    d.add_argument("--negative-prompt")
    d.add_argument("--height", type=int)
    d.add_argument("--width", type=int)
    args = p.parse_args(argv)
    if args.command == "demo":
        threads_before = torch.get_num_threads()
        try:
            _demo(p, args)
        finally:
            torch.set_num_threads(threads_before)  # main() may run inside another program (tests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
