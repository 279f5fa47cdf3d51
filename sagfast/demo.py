"""`sagfast demo`'s pictures: the embedded digit models' panels and a local Stable Diffusion folder's
grid (the command line is sagfast.cli's; this module draws).

Digit demo: one panel per embedded model (the UNet, then the flow-matching DiT), rows the digits 0-9,
columns no guidance, CFG, CFG + SAG (exact), CFG + SAG (batched), then where SAG acts: the mask SAG
blurs at the middle step (red, over the exact column's digit) and |CFG+SAG - CFG| amplified 4x. Every
column starts from the same noise; the time of each column is printed. `settings` (any other SAGConfig
fields: `pag_scale`, `cfg_rule`, ...) go into the two CFG + SAG columns, and the panel's title bar
names them.

Grid geometry (digit demo): each cell is `samples` digits side by side, each 32x32 upscaled by 3 (96
px), 4 px gaps, a 36 px label column on the left and a 40 px header (two-line column titles); a panel
is `36 + 6 * (samples * 96 + 4)` by `40 + 10 * (96 + 4)` pixels (636 x 1040 for 1 sample), and the two
panels stand one above the other under a 24 px title bar each: 636 x 2128.

Importing this module loads neither torch nor diffusers (`sagfast --help` stays fast).
"""

from __future__ import annotations

import time

DIGIT_ZOOM = 3
GAP = 4
LEFT = 36
TOP = 40
TITLE = 24
DIGIT_MODELS = ("unet", "dit")

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
}
"""`--scheduler`'s short names: diffusers scheduler classes."""


class Refused(ValueError):
    """A model of the demo cannot run the guided columns' settings (the engine refused them when the
    pipeline was enabled); raised before any image is made. One line."""


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


def _guided_configs(sag_scale: float, settings: dict | None) -> list:
    """The CFG + SAG columns' configs, exact then batched, with the extra `settings`."""
    from sagfast.config import SAGConfig

    settings = dict(settings or {})
    return [SAGConfig(scale=sag_scale, **settings), SAGConfig(scale=sag_scale, **{**settings, "mode": "batched"})]


def _digit_columns(guidance: float, sag_scale: float, settings: dict | None = None):
    exact, batched = _guided_configs(sag_scale, settings)
    return [
        ("no\nguidance", 1.0, None),
        (f"CFG\ng={guidance:g}", guidance, None),
        (f"CFG+SAG\nexact {sag_scale:g}", guidance, exact),
        (f"CFG+SAG\nbatched {sag_scale:g}", guidance, batched),
    ]


def _fit(pipe, config):
    """`config` for `pipe`: a requested term whose attention layers match nothing in the model (PAG's
    and SEG's "mid" on a DiT, whose self-attention layers are `transformer_blocks.N.attn1`) acts on the
    layer SAG reads instead."""
    import dataclasses

    from sagfast.api import denoisers
    from sagfast.config import TERMS
    from sagfast.families import family_of
    from sagfast.terms.sag import SAG

    family = family_of(pipe)
    model = getattr(pipe, denoisers(pipe)[0])
    changes = {}
    for term in TERMS:
        if not (term.layers_field and term.layers_kind == "attention" and term.requested(config)):
            continue
        try:
            term.layers_of(family, model, config)
        except ValueError:
            changes[term.layers_field] = (family.resolve_layer(model, SAG.capture_of(config)[0])[0],)
    return dataclasses.replace(config, **changes) if changes else config


def _fitted(pipe, configs: list, what: str) -> list:
    """`configs` fitted to `pipe`, each enabled once and disabled: the engine's refusal (a term the model
    cannot run) is raised as Refused before any image is made."""
    import sagfast

    fitted = []
    for config in configs:
        try:
            config = _fit(pipe, config)
            sagfast.enable(pipe, config)
        except ValueError as exc:
            raise Refused(f"the {what} cannot run these settings: {' '.join(str(exc).split())}") from None
        finally:
            sagfast.disable(pipe)
        fitted.append(config)
    return fitted


def _described(config) -> str:
    """The fields of a guided column's config other than the SAG scale, mode and defaults."""
    from sagfast.config import FIELDS

    def shown(value) -> str:
        if isinstance(value, tuple):
            return ",".join(map(shown, value))
        return f"{value:g}" if isinstance(value, float) else str(value)

    changed = [name for name, setting in FIELDS.items() if name not in ("scale", "mode") and getattr(config, name) != setting.default]
    return ", ".join(f"{name}={shown(getattr(config, name))}" for name in changed)


def _mask_overlay(digit, mask, cell: int):
    """The digit (PIL "L") in grey with the SAG mask ([h, w] bool, or None: no mask) in red over it,
    `cell` px square."""
    import numpy as np
    import torch
    from PIL import Image

    grey = np.asarray(digit.resize((cell, cell), Image.NEAREST), dtype=np.float32)
    rgb = np.stack([grey, grey, grey], axis=-1) * 0.6 + 100
    if mask is not None:
        m = mask.float()[None, None]
        m = torch.nn.functional.interpolate(m, size=(cell, cell), mode="nearest")[0, 0].numpy()
        rgb[..., 0] = np.where(m > 0, 255, rgb[..., 0])
        rgb[..., 1:] = np.where(m[..., None] > 0, rgb[..., 1:] * 0.5, rgb[..., 1:])
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def _difference(a, b, cell: int, gain: float = 4.0):
    """|a - b| of two PIL "L" digits, amplified `gain` times, dark on white, `cell` px square."""
    import numpy as np
    from PIL import Image

    d = np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)) * gain
    return Image.fromarray((255 - d.clip(0, 255)).astype(np.uint8)).resize((cell, cell), Image.NEAREST)


def _digit_pipeline(model: str, scheduler):
    """(pipeline, title) of an embedded model."""
    from sagfast.digits import load_dit_pipeline, load_pipeline

    if model == "unet":
        return load_pipeline(scheduler=_scheduler_class(scheduler), progress=False), "UNet (v-prediction, DDIM)"
    pipe = load_dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, "DiT (flow matching, Euler)"


def _digit_panel(model: str, pipe, columns_spec, steps, samples, seed, log):
    """(panel image, column timings) of one embedded model, for `columns_spec` [(title, guidance,
    config or None)]."""
    import torch
    from PIL import Image

    import sagfast
    from sagfast.api import ACTIVE_CALL

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
    for name, g, config in columns_spec:
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
            results["mask"] = masks.get("mask")  # None where SAG is off (scale 0)
    sagfast.disable(pipe)
    exact = next(k for k in results if k.startswith("CFG+SAG\nexact"))
    cfg = next(k for k in results if k.startswith("CFG\n"))
    mask = results.pop("mask")
    for name, imgs in results.items():
        columns.append((name, [imgs[d * samples : (d + 1) * samples] for d in range(10)], "digit"))
    columns.append(
        (
            f"SAG mask\nstep {middle + 1}/{steps}",
            [[(results[exact][i], None if mask is None else mask[i]) for i in range(d * samples, (d + 1) * samples)] for d in range(10)],
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
    return _grid(rendered, [str(d) for d in range(10)], samples * cell, cell), times


def demo_digits(
    out: str,
    steps: int = 15,
    samples: int = 1,
    guidance: float = 3.0,
    sag_scale: float = 0.75,
    seed: int = 0,
    scheduler: str = "ddim",
    threads: int | None = None,
    settings: dict | None = None,
    log=print,
) -> dict:
    """Make the digit demo at `out` (one panel per embedded model); returns {"path", "size", "columns":
    [{"title", "seconds"}]}. `settings`: other SAGConfig fields for the CFG + SAG columns; a model that
    cannot run them raises Refused before any image is made."""
    import torch
    from PIL import Image, ImageDraw

    if threads:
        torch.set_num_threads(threads)
    spec = _digit_columns(guidance, sag_scale, settings)
    models = []
    for model in DIGIT_MODELS:
        pipe, title = _digit_pipeline(model, scheduler)
        exact, batched = _fitted(pipe, [spec[2][2], spec[3][2]], f"{model} digit model")
        models.append((model, pipe, title, [*spec[:2], (*spec[2][:2], exact), (*spec[3][:2], batched)]))
    panels, times = [], []
    for model, pipe, title, columns in models:
        panel, t = _digit_panel(model, pipe, columns, steps, samples, seed, log)
        extra = _described(columns[2][2])
        panels.append((f"{title}; CFG+SAG with {extra}" if extra else title, panel))
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


def _scheduler_class(name: str):
    import diffusers

    if name is None:
        return None
    return getattr(diffusers, SCHEDULERS.get(name, name))


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
    settings: dict | None = None,
    log=print,
) -> dict:
    """CFG vs CFG + SAG on a local Stable Diffusion folder; rows the prompts. `settings`: other
    SAGConfig fields for the CFG + SAG columns (Refused, before any image, where the model cannot run
    them)."""
    import torch
    from diffusers import DiffusionPipeline

    import sagfast

    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    if scheduler:
        pipe.scheduler = _scheduler_class(scheduler).from_config(pipe.scheduler.config)
    pipe = pipe.to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    exact, batched = _fitted(pipe, _guided_configs(sag_scale, settings), f"pipeline at {model}")
    extra = _described(exact)
    if extra:
        log(f"CFG+SAG columns with {extra}")
    cols = [
        (f"CFG\ng={guidance:g}", None),
        (f"CFG+SAG\nexact {sag_scale:g}", exact),
        (f"CFG+SAG\nbatched {sag_scale:g}", batched),
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
