"""The GPU-check stage runner (bench/stages.py) on dummy stages: a failing stage and one that runs
out of time are recorded, the next stages still run, and stages past the budget are skipped."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stages import Stage, gpu_stages, run_stages  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_failures_and_timeouts_are_recorded_and_the_run_goes_on(tmp_path):
    stages = [
        Stage("fails", "echo before; exit 3", 10),
        # The child sleeps on in the background: the whole process group must go at the limit.
        Stage("hangs", "sleep 30 & sleep 30", 1),
        Stage("writes", "echo done > $R/done.txt; $PY -c 'print(1 + 1)'", 10),
    ]
    t0 = time.monotonic()
    records = run_stages(stages, tmp_path / "results", tmp_path / "log.txt", budget_s=60)
    assert time.monotonic() - t0 < 10
    assert [(r["stage"], r["status"], r["rc"]) for r in records] == [("fails", "failed", 3), ("hangs", "timeout", -9), ("writes", "ok", 0)]
    assert (tmp_path / "results" / "done.txt").read_text() == "done\n"
    log = (tmp_path / "log.txt").read_text()
    assert "before" in log and "=== stage hangs: timeout" in log and "\n2\n" in log
    assert json.loads((tmp_path / "results" / "summary.json").read_text()) == records
    assert "| hangs | timeout | -9 |" in (tmp_path / "results" / "summary.md").read_text()


def test_stages_after_the_budget_are_skipped_and_limits_are_cut_to_what_is_left(tmp_path):
    stages = [Stage("long", "sleep 30", 30), Stage("late", "echo ran > $R/late.txt", 10)]
    records = run_stages(stages, tmp_path / "r", tmp_path / "log.txt", budget_s=1.5)
    assert [(r["stage"], r["status"]) for r in records] == [("long", "timeout"), ("late", "skipped")]
    assert records[0]["wall_s"] < 5
    assert not (tmp_path / "r" / "late.txt").exists()


def test_gpu_stage_limits_fit_the_eight_minute_run():
    stages = gpu_stages()
    assert sum(s.limit_s for s in stages) <= 8 * 60 + 90  # the runner's budget (480 s) cuts the rest
    assert [s.name for s in stages][:3] == ["info", "build_ext", "gpu_tests"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_checks_stops_at_once_without_cuda(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_checks.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no CUDA device: ")
    assert not list(tmp_path.iterdir())
