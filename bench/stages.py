"""Runs a list of shell stages, each under its own time limit, and records every outcome.

`bench/gpu_checks.sh` uses it on a CUDA machine, where GPU time may be short and a run must not
stop at its first failure: a stage that fails or runs out of time is recorded and the next one still
runs, and stages that would start after the overall deadline are recorded as skipped. Each stage's
output goes to the log file and to the console; `summary.json` and `summary.md` in the results
folder list every stage with its status, exit code and wall time.

    python -m bench.stages gpu --results DIR --log FILE [--budget S] [--only a,b]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    command: str
    """A bash command line; in it `$R` is the results folder and `$PY` the Python running the stages."""
    limit_s: float
    """Wall-clock limit; at the limit the stage's whole process group is killed."""


def gpu_stages() -> list[Stage]:
    """The GPU checks, in order of what matters most when time runs out. Limits sum to <= 8 minutes
    with the extension build; the figures in the comments are what the stages are expected to take
    on an H100/H200."""
    step = (
        "$PY -m bench step --device cuda --dtype fp16 --models sd15 --size 512 --batch {b} --rounds 5 --warmup 2 "
        "--variants cfg,floor,cfg_graph,floor_graph,sagfast_exact,sagfast_batched,sagfast_exact_graph,sagfast_batched_graph --out $R/step_b{b}"
    )
    return [
        Stage("info", "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PY -m sagfast.info | tee $R/info.txt", 30),
        # One architecture, the device's own: several times faster to build than torch's default list.
        Stage(
            "build_ext",
            'export TORCH_CUDA_ARCH_LIST="$($PY -c \'import torch; print("%d.%d" % torch.cuda.get_device_capability())\')"; '
            "MAX_JOBS=16 $PY setup.py -q build_ext --inplace && $PY -m sagfast.info | tee $R/info_built.txt",
            100,  # 55-68 s measured on the H200
        ),
        Stage(
            "gpu_tests",
            "$PY -m pytest -q -m gpu tests -p no:cacheprovider -rfE --continue-on-collection-errors 2>&1 | tee $R/gpu_tests.txt; exit ${PIPESTATUS[0]}",
            150,
        ),
        Stage("step_b1", step.format(b=1), 60),  # 50 s measured
        # The guidance engine's variants (PAG, SAG+PAG in both exact layouts and batched, graphed).
        Stage(
            "engine_b1",
            "$PY -m bench step --device cuda --dtype fp16 --models sd15 --size 512 --batch 1 --rounds 5 --warmup 2 "
            "--variants cfg,pag,sagfast_pag,sagfast_sag_pag_exact,sagfast_sag_pag_exact_degraded,sagfast_sag_pag_batched,"
            "sagfast_sag_interval,sagfast_pag_graph,sagfast_sag_pag_batched_graph --out $R/engine_b1",
            70,
        ),
        Stage("step_b4", step.format(b=4), 60),  # 52 s measured
        Stage("half_precision", "$PY -m bench.half_precision --device cuda --out $R", 35),
        Stage("kernels", "$PY -m bench kernels --device cuda --video --out $R", 30),
        Stage("memory", "$PY -m bench memory --device cuda --out $R", 35),
    ]


def _run_one(stage: Stage, results: Path, log) -> dict:
    env = dict(os.environ, R=str(results), PY=sys.executable, PYTHONUNBUFFERED="1")
    start = time.monotonic()
    # A new session: on time-out the whole group goes (pytest's workers, a compiler, a pipe's tee).
    proc = subprocess.Popen(
        ["bash", "-c", stage.command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=stage.limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    wall = time.monotonic() - start
    text = out.decode(errors="replace")
    log.write(text)
    sys.stdout.write(text)
    if timed_out:
        status = "timeout"
    else:
        status = "ok" if proc.returncode == 0 else "failed"
    return {"stage": stage.name, "status": status, "rc": proc.returncode, "wall_s": round(wall, 1), "limit_s": stage.limit_s}


def run_stages(stages: list[Stage], results: Path, log_path: Path, budget_s: float) -> list[dict]:
    """Runs `stages` in order; a stage whose start comes after `budget_s` is skipped, and a stage's
    limit is cut to what is left of the budget. Returns one record per stage."""
    results.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    records = []
    with open(log_path, "a") as log:
        for stage in stages:
            left = deadline - time.monotonic()
            header = f"\n=== stage {stage.name} (limit {min(stage.limit_s, max(left, 0)):.0f} s): {stage.command}\n"
            log.write(header)
            sys.stdout.write(header)
            log.flush()
            if left <= 1:
                rec = {"stage": stage.name, "status": "skipped", "rc": None, "wall_s": 0.0, "limit_s": stage.limit_s}
            else:
                rec = _run_one(dataclasses.replace(stage, limit_s=min(stage.limit_s, left)), results, log)
            records.append(rec)
            line = f"=== stage {stage.name}: {rec['status']} (rc {rec['rc']}, {rec['wall_s']} s)\n"
            log.write(line)
            sys.stdout.write(line)
            log.flush()
    (results / "summary.json").write_text(json.dumps(records, indent=2))
    rows = ["| stage | status | rc | wall s | limit s |", "|---|---|---|---|---|"]
    rows += [f"| {r['stage']} | {r['status']} | {r['rc']} | {r['wall_s']} | {r['limit_s']} |" for r in records]
    (results / "summary.md").write_text("\n".join(rows) + "\n")
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=["gpu"])
    p.add_argument("--results", required=True, help="folder for every stage's results ($R in a stage)")
    p.add_argument("--log", required=True, help="file the stages' output is appended to")
    p.add_argument("--budget", type=float, default=480, help="seconds for all stages together (default 480)")
    p.add_argument("--only", help="comma-separated stage names to run (default: all)")
    opts = p.parse_args(argv)
    stages = gpu_stages()
    if opts.only:
        wanted = opts.only.split(",")
        unknown = sorted(set(wanted) - {s.name for s in stages})
        if unknown:
            p.error(f"unknown stage(s) {unknown}; stages: {[s.name for s in stages]}")
        stages = [s for s in stages if s.name in wanted]
    records = run_stages(stages, Path(opts.results), Path(opts.log), opts.budget)
    print((Path(opts.results) / "summary.md").read_text())
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
