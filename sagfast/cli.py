"""The `sagfast` command.

    sagfast demo [--out sag_demo.png] [--steps 15]
        The two embedded digit models, one panel each (the UNet, then the flow-matching DiT): a
        labelled grid, rows the digits 0-9, columns no guidance, CFG, CFG + SAG (exact), CFG + SAG
        (batched), then where SAG acts: the mask SAG blurs at the middle step (red, over the exact
        column's digit) and |CFG+SAG - CFG| amplified 4x. Every column starts from the same noise; the
        time of each column is printed.

    sagfast demo --model DIR --prompt "a photo of a cat" [--prompt ...]
        The same with a local diffusers Stable Diffusion folder (SD 1.x / 2.x / XL, local files only):
        rows the prompts, columns CFG, CFG + SAG (exact) and CFG + SAG (batched).

    sagfast serve [--host 127.0.0.1] [--port 8000] [--model NAME=PATH_OR_REPO ...] [--replicas 1]
                  [--gpus-per-replica 0] [--max-batch-size 8] [--batch-wait-ms 10] [--max-queue 64]
                  [--max-steps 50] [--max-size 1024] [--group-by shape|settings] [--address RAY_ADDRESS]
        The embedded digit models ("digits-unet", "digits-dit") and any diffusers pipeline sagfast
        guides, on Ray Serve (`pip install "sagfast[serve]"`): POST /v1/images, GET /v1/models, GET
        /health, GET /docs. Requests that share the model, steps, size and SAG mode share one guided
        pipeline call, whatever their guidance settings. Prints the URL when ready; Ctrl-C stops it.

Grid geometry (digit demo): each cell is `--samples` digits side by side, each 32x32 upscaled by 3
(96 px), 4 px gaps, a 36 px label column on the left and a 40 px header (two-line column titles); a
panel is `36 + 6 * (samples * 96 + 4)` by `40 + 10 * (96 + 4)` pixels (636 x 1040 for 1 sample), and
the two panels stand one above the other under a 24 px title bar each: 636 x 2128.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

DIGIT_ZOOM = 3
GAP = 4
LEFT = 36
TOP = 40


TITLE = 24
DIGIT_MODELS = ("unet", "dit")


def digit_grid_size(columns: int, samples: int = 1) -> tuple[int, int]:
    """(width, height) of one panel of the digit demo."""
    cell = 32 * DIGIT_ZOOM
    return LEFT + columns * (samples * cell + GAP), TOP + 10 * (cell + GAP)


def digit_demo_size(samples: int = 1) -> tuple[int, int]:
    """(width, height) of the digit demo's PNG: one 6-column panel per model, each under a title bar."""
    width, height = digit_grid_size(6, samples)
    return width, len(DIGIT_MODELS) * (TITLE + height)


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


def _mask_overlay(digit, mask, cell: int):
    """The digit (PIL "L") in grey with the SAG mask ([h, w] bool) in red over it, `cell` px square."""
    import numpy as np
    import torch
    from PIL import Image

    grey = np.asarray(digit.resize((cell, cell), Image.NEAREST), dtype=np.float32)
    m = mask.float()[None, None]
    m = torch.nn.functional.interpolate(m, size=(cell, cell), mode="nearest")[0, 0].numpy()
    rgb = np.stack([grey, grey, grey], axis=-1) * 0.6 + 100
    rgb[..., 0] = np.where(m > 0, 255, rgb[..., 0])
    rgb[..., 1:] = np.where(m[..., None] > 0, rgb[..., 1:] * 0.5, rgb[..., 1:])
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def _difference(a, b, cell: int, gain: float = 4.0):
    """|a - b| of two PIL "L" digits, amplified `gain` times, dark on white, `cell` px square."""
    import numpy as np
    from PIL import Image

    d = np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)) * gain
    return Image.fromarray((255 - d.clip(0, 255)).astype(np.uint8)).resize((cell, cell), Image.NEAREST)


def _digit_panel(model: str, steps, samples, guidance, sag_scale, seed, scheduler, log):
    """(title, panel image, column timings) of one embedded model."""
    import torch
    from PIL import Image

    import sagfast
    from sagfast.api import ACTIVE_CALL
    from sagfast.digits import load_dit_pipeline, load_pipeline

    if model == "unet":
        pipe, title = load_pipeline(scheduler=_scheduler_class(scheduler), progress=False), "UNet (v-prediction, DDIM)"
    else:
        pipe, title = load_dit_pipeline(), "DiT (flow matching, Euler)"
        pipe.set_progress_bar_config(disable=True)
    labels = [d for d in range(10) for _ in range(samples)]
    noise = torch.randn(len(labels), 1, 32, 32, generator=torch.Generator().manual_seed(seed))
    cell = 32 * DIGIT_ZOOM
    middle = steps // 2
    masks = {}

    def keep_middle_mask(pipe, i, t, kwargs):
        call = ACTIVE_CALL.get()
        if i == middle and call is not None and call.last_mask is not None:
            masks["mask"] = call.last_mask.clone()
        return {}

    columns, times, results = [], [], {}
    for name, g, config in _digit_columns(guidance, sag_scale):
        if config is None:
            sagfast.disable(pipe)
        else:
            sagfast.enable(pipe, config)
        t0 = time.perf_counter()
        out = pipe(
            labels,
            num_inference_steps=steps,
            guidance_scale=g,
            latents=noise.clone(),
            output_type="pil",
            callback_on_step_end=keep_middle_mask,
        )
        dt = time.perf_counter() - t0
        label = f"{model}: " + name.replace("\n", " ")
        times.append({"title": label, "seconds": round(dt, 3)})
        log(f"{label:>28}: {dt:6.2f} s  ({len(labels)} digits, {steps} steps)")
        results[name] = [img.convert("L") for img in out.images]
        if name.startswith("CFG+SAG\nexact"):
            results["mask"] = masks.get("mask")
    sagfast.disable(pipe)
    exact = next(k for k in results if k.startswith("CFG+SAG\nexact"))
    cfg = next(k for k in results if k.startswith("CFG\n"))
    mask = results.pop("mask")
    for name, imgs in results.items():
        columns.append((name, [imgs[d * samples : (d + 1) * samples] for d in range(10)], "digit"))
    columns.append(
        (
            f"SAG mask\nstep {middle + 1}/{steps}",
            [[(results[exact][i], mask[i]) for i in range(d * samples, (d + 1) * samples)] for d in range(10)],
            "mask",
        )
    )
    columns.append(
        (
            "|SAG - CFG|\nx4",
            [[(results[exact][i], results[cfg][i]) for i in range(d * samples, (d + 1) * samples)] for d in range(10)],
            "diff",
        )
    )
    rendered = []
    for name, rows, kind in columns:
        cells = []
        for row in rows:
            strip = Image.new("RGB", (samples * cell, cell), "white")
            for k, item in enumerate(row):
                if kind == "digit":
                    img = item.resize((cell, cell), Image.NEAREST)
                elif kind == "mask":
                    img = _mask_overlay(*item, cell)
                else:
                    img = _difference(*item, cell)
                strip.paste(img.convert("RGB"), (k * cell, 0))
            cells.append(strip)
        rendered.append((name, cells))
    return title, _grid(rendered, [str(d) for d in range(10)], samples * cell, cell), times


def demo_digits(
    out: str,
    steps: int = 15,
    samples: int = 1,
    guidance: float = 3.0,
    sag_scale: float = 0.75,
    seed: int = 0,
    scheduler: str = "ddim",
    threads: int | None = None,
    log=print,
) -> dict:
    """Make the digit demo at `out` (one panel per embedded model); returns {"path", "size", "columns":
    [{"title", "seconds"}]}."""
    import torch
    from PIL import Image, ImageDraw

    if threads:
        torch.set_num_threads(threads)
    panels, times = [], []
    for model in DIGIT_MODELS:
        title, panel, t = _digit_panel(model, steps, samples, guidance, sag_scale, seed, scheduler, log)
        panels.append((title, panel))
        times += t
    width = max(p.width for _, p in panels)
    canvas = Image.new("RGB", (width, sum(TITLE + p.height for _, p in panels)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for title, panel in panels:
        draw.rectangle((0, y, width, y + TITLE - 2), fill=(230, 230, 230))
        draw.text((6, y + 5), title, fill="black", font=_font())
        canvas.paste(panel, (0, y + TITLE))
        y += TITLE + panel.height
    canvas.save(out)
    log(f"wrote {out} ({canvas.width}x{canvas.height})")
    return {"path": out, "size": canvas.size, "columns": times}


SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
}


def _scheduler_class(name: str):
    import diffusers

    if name is None:
        return None
    return getattr(diffusers, SCHEDULERS.get(name, name))


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
    import torch
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


def _demo(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    elif (os.cpu_count() or 1) <= 2:
        # On a small shared machine two OpenMP threads spin-wait on each other while other processes
        # hold the cores: one thread is many times faster there.
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.model:
        demo_sd(
            args.model,
            args.prompt,
            args.out,
            steps=25 if args.steps is None else args.steps,
            guidance=7.5 if args.guidance is None else args.guidance,
            sag_scale=args.sag_scale,
            seed=args.seed,
            height=args.height,
            width=args.width,
            negative_prompt=args.negative_prompt,
            scheduler=args.scheduler,
        )
    else:
        demo_digits(
            args.out,
            steps=15 if args.steps is None else args.steps,
            samples=args.samples,
            guidance=3.0 if args.guidance is None else args.guidance,
            sag_scale=args.sag_scale,
            seed=args.seed,
            scheduler=args.scheduler or "ddim",
        )
    print(f"total {time.perf_counter() - t0:.1f} s")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a positive integer expected, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a positive integer expected, got {text}")
    return value


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number expected, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"a finite number >= 0 expected, got {text}")
    return value


def _pixels(text: str) -> int:
    value = _positive(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"a multiple of 8 expected, got {text}")
    return value


def demo_scheduler_classes() -> list[str]:
    """The diffusers scheduler class names `--scheduler` accepts: those diffusers lists as compatible
    with the digit UNet's schedule (DDIMScheduler's `compatibles`: the DDPM-type schedulers an SD or
    v-prediction UNet runs with) that build from it here (DPMSolverSDEScheduler needs torchsde) and
    that SAG takes (EDM's sigma-only schedulers have no alphas_cumprod). A flow-matching or
    consistency-model scheduler would give the UNet inputs it was not trained on."""
    from diffusers import DDIMScheduler
    from diffusers.utils import logging

    from sagfast.core.schedule import schedule_problems
    from sagfast.digits.weights import scheduler_config

    config = scheduler_config()
    accepted = []
    level = logging.get_verbosity()
    # A class ignores the config keys it has no use for, with a warning: a refused option's message
    # is to be one line.
    logging.set_verbosity_error()
    try:
        for cls in DDIMScheduler.from_config(config).compatibles:
            try:
                scheduler = cls.from_config(config)
            except ImportError:  # an optional dependency it needs is not installed
                continue
            if not schedule_problems(scheduler):
                accepted.append(cls.__name__)
    finally:
        logging.set_verbosity(level)
    return sorted(accepted)


def _scheduler(text: str) -> str:
    if text in SCHEDULERS:
        return text
    accepted = demo_scheduler_classes()
    if text in accepted:
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is not one of {', '.join(SCHEDULERS)} nor of the diffusers schedulers the demo's UNets run with ({', '.join(accepted)})"
    )


SEED_LIMIT = 2**63


def _seed(text: str) -> int:
    # torch's manual_seed takes 64 bits; the SD demo seeds prompt i with seed + i, so below 2**63.
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer 0 <= seed < 2**63 expected, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"an integer 0 <= seed < 2**63 expected, got {text}")
    return value


def _check(p: argparse.ArgumentParser, args) -> None:
    """What the options say together, and the paths, before any work is done."""
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        p.error(f"argument --out: the folder {folder} does not exist")
    if not args.out.lower().endswith(".png"):
        p.error(f"argument --out: a .png path expected, got {args.out}")
    if args.model:
        if not os.path.isfile(os.path.join(args.model, "model_index.json")):
            p.error(f"argument --model: {args.model} is not a local diffusers pipeline folder (no model_index.json there)")
        if not args.prompt:
            p.error("argument --model: needs at least one --prompt")
        if args.samples != 1:
            p.error("argument --samples: only for the digit demo (without --model)")
    else:
        if args.prompt:
            p.error("argument --prompt: needs --model DIR (the digit model takes no prompt)")
        for name in ("negative_prompt", "height", "width"):
            if getattr(args, name) is not None:
                p.error(f"argument --{name.replace('_', '-')}: only with --model DIR")


def _model_spec(text: str) -> tuple[str, str]:
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"NAME=PATH_OR_REPO expected (e.g. sd=./my-sd-folder), got {text!r}")
    return name, source


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number >= 0 expected, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"a number >= 0 expected, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port 1..65535 expected, got {text}")
    return value


def _serve_parser(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="serve guided pipelines over HTTP on Ray Serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    s.add_argument("--port", type=_port, default=8000, help="HTTP port (default 8000)")
    s.add_argument(
        "--model", type=_model_spec, action="append", default=[], help="NAME=PATH_OR_REPO: a diffusers pipeline to serve too (repeat)"
    )
    s.add_argument("--no-digits", action="store_true", help="do not serve the embedded digit models")
    s.add_argument("--replicas", type=_positive, default=1, help="replicas of the deployment (default 1)")
    s.add_argument("--gpus-per-replica", type=_fraction, default=0.0, help="GPUs per replica; > 0 runs the models on CUDA (default 0: CPU)")
    s.add_argument("--max-batch-size", type=_positive, default=8, help="requests per model call at most (default 8; 1: no batching)")
    s.add_argument("--batch-wait-ms", type=_fraction, default=10.0, help="how long a batch waits for more requests (default 10 ms)")
    s.add_argument("--max-queue", type=_positive, default=64, help="requests a replica holds before answering 503 (default 64)")
    s.add_argument("--max-steps", type=_positive, default=50, help="largest `steps` a request may ask (default 50)")
    s.add_argument("--max-size", type=_pixels, default=1024, help="largest image side in pixels (default 1024)")
    s.add_argument(
        "--group-by",
        choices=("shape", "settings"),
        default="shape",
        help="shape: any guidance settings share a call (default); settings: only identical ones",
    )
    s.add_argument("--address", help="join the Ray cluster at this address (e.g. auto, or HEAD_IP:6379) instead of starting one")


def _serve(args) -> int:
    import signal
    import threading

    from sagfast.serving import DEFAULT_MODELS, StartupError, start, stop
    from sagfast.serving.schema import Limits

    specs = {} if args.no_digits else dict(DEFAULT_MODELS)
    for name, source in args.model:
        specs[name] = source
    if not specs:
        print("sagfast serve: no models to serve (--no-digits and no --model)", file=sys.stderr)
        return 2
    limits = Limits(args.max_steps, args.max_size, args.max_batch_size, args.batch_wait_ms, args.max_queue, args.group_by)
    try:
        url = start(specs, limits, args.host, args.port, args.replicas, args.gpus_per_replica, args.address)
    except StartupError as exc:
        print(f"sagfast serve: {exc}", file=sys.stderr)
        return 2
    stopped = threading.Event()
    try:
        # After start: ray.init installs its own SIGTERM handler (it aborts the process); a SIGTERM
        # (a process manager, a container stop) is to stop the server as Ctrl-C does.
        signal.signal(signal.SIGTERM, lambda *_: stopped.set())
        print(f"sagfast serving {', '.join(specs)} at {url} (API docs: {url}/docs)", flush=True)
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(args.address)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sagfast", description="Self-Attention Guidance for diffusers, fast.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="a labelled PNG grid: no guidance / CFG / CFG + SAG",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--out", default="sag_demo.png", help="PNG path, in a folder that exists (default: sag_demo.png)")
    d.add_argument("--steps", type=_positive, help="denoising steps (default: 15 digits, 25 SD)")
    d.add_argument("--guidance", type=_scale, help="CFG scale, >= 0 (default: 3 digits, 7.5 SD)")
    d.add_argument("--sag-scale", type=_scale, default=0.75, help="SAG scale, >= 0 (default 0.75)")
    d.add_argument("--seed", type=_seed, default=0, help="the noise's seed, 0 <= seed < 2**63 (default 0)")
    d.add_argument("--samples", type=_positive, default=1, help="digit demo: samples per cell (default 1)")
    d.add_argument(
        "--scheduler",
        type=_scheduler,
        help=f"the UNet's scheduler (the digit UNet's, or --model's; the DiT panel keeps its flow-matching Euler): "
        f"{', '.join(SCHEDULERS)} (default ddim), or a diffusers scheduler class compatible with DDIMScheduler that SAG accepts",
    )
    d.add_argument("--threads", type=_positive, help="torch.set_num_threads (default: torch's; 1 on machines with <= 2 cores)")
    d.add_argument("--model", help="a local diffusers Stable Diffusion folder (instead of the digit model)")
    d.add_argument("--prompt", action="append", help="with --model: a prompt (repeat for more rows)")
    d.add_argument("--negative-prompt", help="with --model")
    d.add_argument("--height", type=_pixels, help="with --model: image height in pixels (a multiple of 8)")
    d.add_argument("--width", type=_pixels, help="with --model: image width in pixels (a multiple of 8)")
    _serve_parser(sub)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "demo":
        _check(p, args)
        import torch

        threads_before = torch.get_num_threads()
        try:
            _demo(args)
        finally:
            torch.set_num_threads(threads_before)  # main() may run inside another program (tests)
    elif args.command == "serve":
        return _serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
