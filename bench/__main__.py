"""python -m bench SCENARIO [--quick] [--out DIR] [...]   (python -m bench SCENARIO --help: its options)

Scenarios: step, overhead, memory, kernels, e2e, video, or all (each in turn, plus DIR/PERFORMANCE.md);
serve (the server under load: starts local Ray Serve servers, so not part of all).
Each exits non-zero when a row it ran failed (a row skipped for a stated reason is not a failure) and
writes DIR/<scenario>.json (machine, versions, dtype, settings, rows, raw samples), .csv, .md
(a markdown table) and, where it helps, a .png plot.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from bench import common

SCENARIOS = ("step", "overhead", "memory", "kernels", "e2e", "video")


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_list(text: str) -> list:
    return [_positive(part) for part in text.split(",")]


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small models and few rounds: a CPU run in minutes")
    p.add_argument("--out", default="bench-results", help="output folder (default: bench-results)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=_positive, help="torch.set_num_threads (default: torch's)")


def _timing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=_positive, help="timed rounds (after warm-up)")
    p.add_argument("--warmup", type=_count, help="untimed warm-up rounds")


def _pipelines(p: argparse.ArgumentParser, variants: bool = True) -> None:
    p.add_argument("--models", help="comma-separated: tiny, tiny_xl, sd15, sdxl (e2e: digits, sd15)")
    p.add_argument("--full", action="store_true", help="on CPU too: the SDXL-shaped model (slow)")
    p.add_argument("--size", type=_positive, help="image side in pixels (default per model and device)")
    if variants:
        p.add_argument("--steps", type=_positive, help="denoising steps per pipeline call")
        p.add_argument(
            "--variants",
            help="comma-separated step variants: cfg, floor, cfg_graph, floor_graph (CUDA), diffusers_sag, pag, sagfast_exact, sagfast_batched, "
            "sagfast_sag_interval, sagfast_pag, sagfast_sag_pag_exact, sagfast_sag_pag_exact_degraded, "
            "sagfast_sag_pag_batched, and any sagfast variant + _graph (CUDA); on an SDXL-shaped model (tiny_xl, sdxl) "
            "the modular pipeline's modular_cfg, modular_pag, modular_sag, modular_sag_batched_mode, each also + _joined "
            "(sagfast.modular.batch_guidance)",
        )


SCENARIO_HELP = {
    "step": "ms per denoising step of each guidance variant",
    "overhead": "what each part of a SAG step costs (capture, mass, degrade, combine)",
    "memory": "peak memory of the attention-mass capture against the dense map",
    "kernels": "each op per backend against its PyTorch reference",
    "e2e": "whole pipeline calls per mode",
    "video": "ms per denoising step of Wan's guidance variants (CFG's two calls joined, SAG, PAG, STG)",
    "serve": "sagfast serve under closed-loop load: no batching, identical-settings batching, mixed batching",
    "all": "every scenario in turn, plus DIR/PERFORMANCE.md",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name, text in SCENARIO_HELP.items():
        s = sub.add_parser(name, help=text, description=f"python -m bench {name}: {text}.")
        _common(s)
        if name in ("step", "overhead", "e2e", "all"):
            _timing(s)
            _pipelines(s, variants=name != "overhead")
        if name in ("step", "all"):
            s.add_argument("--batch", type=_positive, default=1, help="images per call (B; a CFG call is 2B)")
        if name in ("memory", "all"):
            s.add_argument(
                "--tokens", help="comma-separated N (default 1024,4096,16384; Wan video: 32760 at 480p, 75600 at 720p, 81 frames)"
            )
            s.add_argument("--heads", type=_positive, help="attention heads (default 8)")
            s.add_argument("--head-dim", type=_positive, help="head dimension (default 40)")
        if name == "video":
            _timing(s)
            s.add_argument("--models", help="comma-separated: wan_tiny, wan_small (default both; --quick: wan_tiny)")
            s.add_argument("--steps", type=_positive, help="denoising steps per pipeline call (default 8; --quick 4)")
            s.add_argument(
                "--variants",
                help="comma-separated: cfg, cfg_joined, sag_exact, sag_batched, pag, stg_block, stg_attention, sag_pag_stg_batched",
            )
        if name == "kernels":
            s.add_argument("--video", action="store_true", help="also the attention mass at Wan's video N (32760 at 480p, 75600 at 720p)")
        if name == "serve":
            s.add_argument("--concurrency", type=_positive_list, help="comma-separated client counts (default 1,2,4,8,16; --quick 1,4,8)")
            s.add_argument("--requests", type=_positive, help="requests per concurrency level (default 64; --quick 24)")
    return p


def parse(argv=None):
    p = parser()
    opts = p.parse_args(argv)
    # What a scenario has no option for, as the scenarios read it (settings_of records them all).
    for name, value in dict(
        models=None,
        variants=None,
        tokens=None,
        full=False,
        size=None,
        steps=None,
        rounds=None,
        warmup=None,
        batch=1,
        concurrency=None,
        requests=None,
        heads=None,
        head_dim=None,
        video=False,
    ).items():
        opts.__dict__.setdefault(name, value)
    opts.command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    opts.device = common.pick_device(opts.device)
    opts.dtype = common.DTYPES[opts.dtype or ("fp16" if opts.device.type == "cuda" else "fp32")]
    opts.models = opts.models.split(",") if opts.models else None
    opts.variants = opts.variants.split(",") if opts.variants else None
    if opts.scenario == "video":
        from bench import video

        for field, known in (("models", video.MODELS), ("variants", video.VARIANTS)):
            unknown = [n for n in getattr(opts, field) or () if n not in known]
            if unknown:
                p.error(f"argument --{field}: unknown {unknown}; choose from {', '.join(known)}")
    try:
        opts.tokens = [int(n) for n in opts.tokens.split(",")] if opts.tokens else None
    except ValueError:
        p.error(f"argument --tokens: comma-separated integers expected, got {opts.tokens!r}")
    return opts


def settings_of(opts) -> dict:
    keep = (
        "scenario",
        "quick",
        "full",
        "models",
        "variants",
        "size",
        "steps",
        "rounds",
        "warmup",
        "tokens",
        "threads",
        "out",
        "command",
        "concurrency",
        "requests",
        "heads",
        "head_dim",
        "video",
    )
    return {k: getattr(opts, k) for k in keep}


def run_kernels(opts, record: dict) -> dict:
    """Scenario "kernels": each op per backend against its reference (bench.kernels)."""
    from bench import kernels

    columns = [("op", "op"), ("backend", "backend"), ("status", "status")]
    rows = list(kernels.run(opts.quick, opts.device, opts.dtype, opts.video))
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    return {"title": "Kernels per backend", "rows": rows, "notes": [], "columns": [(k, k) for k in keys] or columns}


def run_scenario(name: str, opts, out_dir: Path) -> list:
    """Runs one scenario and writes its files; returns its failed rows."""
    runner = run_kernels if name == "kernels" else importlib.import_module(f"bench.{name}").run
    settings = settings_of(opts)
    settings["scenario"] = name
    record = common.machine_record(opts.device, opts.dtype, settings)
    t0 = time.perf_counter()
    result = runner(opts, record)
    record["scenario_wall_s"] = round(time.perf_counter() - t0, 1)
    if opts.device.type != "cuda":
        result["notes"] = [*result.get("notes", []), "CPU figures (no CUDA device in this run)."]
    plots = result.pop("plots", [])
    columns = result.pop("columns")
    title = result.pop("title")
    result = {"scenario": name, "machine": record, **result}
    written = []
    for filename, draw in plots:
        if not result.get("rows"):
            break
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = common.plot(out_dir / filename, draw)
        except Exception as exc:  # a plot is a convenience; the numbers are in the JSON
            common.log(f"plot {filename} failed: {type(exc).__name__}: {exc}")
            path = None
        if path:
            written.append(filename)
    result["plots"] = written
    path = common.write_results(out_dir, name, result, columns, title)
    common.log(f"{name}: wrote {path} (+ .csv, .md{', ' + ', '.join(written) if written else ''}) in {record['scenario_wall_s']} s")
    print((out_dir / f"{name}.md").read_text())
    return common.failed_rows(result.get("rows", []))


def main(argv=None) -> int:
    opts = parse(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    elif opts.device.type == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if load > cores and torch.get_num_threads() > 1:
            common.log(
                f"warning: load average {load:.1f} on {cores} cores: with {torch.get_num_threads()} torch threads an "
                "oversubscribed CPU makes timings erratic (threads wait on each other); --threads 1 is steadier"
            )
    out_dir = Path(opts.out)
    names = SCENARIOS if opts.scenario == "all" else (opts.scenario,)
    failed = []
    for name in names:
        failed += [(name, row) for row in run_scenario(name, opts, out_dir)]
    if opts.scenario == "all":
        parts = ["## Performance", "", f"Generated by `{opts.command}`.", ""]
        parts += [(out_dir / f"{n}.md").read_text() for n in names if (out_dir / f"{n}.md").exists()]
        (out_dir / "PERFORMANCE.md").write_text("\n".join(parts))
        common.log(f"wrote {out_dir / 'PERFORMANCE.md'}")
    for name, row in failed:
        common.log(f"FAILED {name}: {row['status']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
