"""Smoke test of the benchmark CLI: a quick step run on the tiny UNet writes valid JSON (no timing asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _strict(const):
    raise ValueError(f"invalid JSON constant {const}")


def test_cli_step_modular_rows(tmp_path):
    out = tmp_path / "out"
    variants = "cfg,modular_cfg,modular_cfg_joined,modular_sag_batched_mode_joined"
    common = ["--quick", "--device", "cpu", "--steps", "2", "--rounds", "1", "--warmup", "0", "--threads", "1"]
    cmd = [sys.executable, "-m", "bench", "step", *common, "--out", str(out), "--models", "tiny_xl,tiny", "--variants", variants]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {(r["model"], r["key"]): r for r in json.loads((out / "step.json").read_text(), parse_constant=_strict)["rows"]}
    for key in variants.split(","):
        assert rows["tiny_xl", key]["status"] == "ok", rows["tiny_xl", key]
        assert math.isfinite(rows["tiny_xl", key]["ms_per_step"])
    assert math.isfinite(rows["tiny_xl", "modular_cfg_joined"]["x_separate"])
    # asked for on a model without SDXL's conditioning: listed with the reason
    assert "needs an SDXL-shaped UNet" in rows["tiny", "modular_cfg"]["status"]


def test_cli_step_quick_writes_valid_json(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "step",
        "--quick",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--models",
        "tiny",
        "--variants",
        "cfg,floor,cfg_graph,floor_graph,sagfast_exact,sagfast_exact_graph",
        "--steps",
        "2",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    data = json.loads((out / "step.json").read_text(), parse_constant=_strict)
    machine = data["machine"]
    assert data["scenario"] == "step"
    assert machine["cpu_model"] and machine["cpu_cores"] >= 1
    assert machine["device"] == "cpu" and machine["gpu_name"] is None
    assert set(machine["versions"]) >= {"torch", "triton", "diffusers", "sagfast"}
    assert machine["versions"]["torch"] and machine["versions"]["diffusers"]
    assert machine["dtype"] == "float32"
    assert machine["settings"]["quick"] is True and machine["settings"]["rounds"] == 1

    rows = {r["key"]: r for r in data["rows"]}
    for key in ("cfg", "floor", "sagfast_exact"):
        assert rows[key]["status"] == "ok", rows[key]
        assert isinstance(rows[key]["ms_per_step"], float) and math.isfinite(rows[key]["ms_per_step"])
        assert rows[key]["model"] == "tiny" and rows[key]["steps"] == 2
    # a variant that cannot run here is listed with its reason, never silently dropped or faked
    for key in ("sagfast_exact_graph", "cfg_graph", "floor_graph"):
        assert "(no CUDA here)" in rows[key]["status"], rows[key]
    assert (out / "step.csv").read_text().startswith("model,")
    assert "| (d) sagfast exact |" in (out / "step.md").read_text()
    assert "CPU figures (no CUDA device in this run)" in (out / "step.md").read_text()


def test_half_precision_bench_runs_and_fp32_matches_diffusers():
    import torch

    from bench.half_precision import run, table

    result = run(torch.device("cpu"), steps=2, batch=1)
    assert len(result["rows"]) == 8  # 2 schedulers x 2 predictions x (fp16, bf16)
    for r in result["rows"]:
        # In fp32 both SAG implementations agree (the parity tests' tolerance), so the half-precision
        # columns measure rounding, not a different algorithm.
        assert r["fp32_sagfast_vs_diffusers"] <= 1e-3
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("effect", "plain", "diffusers", "sagfast"))
    assert "| DDIM | epsilon | fp16 |" in table(result)


def _bench(args, tmp_path, **env):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_e2e_quick_runs_every_row_and_exits_0(tmp_path):
    proc = _bench(["e2e", "--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    statuses = {r["mode"]: r["status"] for r in rows}
    for mode in ("CFG only (no SAG)", "sagfast exact", "sagfast batched"):
        assert statuses[mode] == "ok", statuses
    assert all(s == "ok" or s.startswith("skipped: ") for s in statuses.values()), statuses


def test_a_failing_row_makes_the_scenario_exit_non_zero(tmp_path):
    proc = _bench(["e2e", "--quick", "--device", "cpu", "--out", str(tmp_path)], tmp_path, SAGFAST_DIGITS_WEIGHTS=str(tmp_path / "missing"))
    assert proc.returncode == 1
    assert "FAILED e2e: error: the digit pipeline does not load" in proc.stderr
    assert json.loads((tmp_path / "e2e.json").read_text())["rows"][0]["status"].startswith("error: ")


def test_each_scenario_help_shows_its_own_options(tmp_path):
    e2e = _bench(["e2e", "--help"], tmp_path)
    memory = _bench(["memory", "--help"], tmp_path)
    assert e2e.returncode == memory.returncode == 0
    assert "--steps" in e2e.stdout and "--tokens" not in e2e.stdout
    assert "--tokens" in memory.stdout and "--variants" not in memory.stdout
    bad = _bench(["step", "--steps", "0"], tmp_path)
    assert bad.returncode == 2 and "argument --steps: must be a positive integer, got 0" in bad.stderr


def test_kernels_video_rows_time_the_attention_mass_at_wan_n():
    import torch

    from bench.kernels import cases

    def shapes(video):
        return [c["shape"] for c in cases(True, torch.device("cpu"), torch.float32, video) if c["op"] == "attention_mass"]

    assert shapes(True) == shapes(False) + ["B1 H1 N32760 D16", "B1 H1 N75600 D16"]


def test_video_quick_runs_every_variant_and_refuses_unknown_ones(tmp_path):
    proc = _bench(
        ["video", "--quick", "--device", "cpu", "--steps", "3", "--rounds", "1", "--warmup", "0", "--out", str(tmp_path)], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "video.json").read_text())["rows"]
    assert len(rows) == 8 and all(r["status"] == "ok" and r["ms_per_step"] > 0 for r in rows), rows
    assert rows[0]["x_cfg"] == 1.0
    bad = _bench(["video", "--variants", "cfg,sag_fast"], tmp_path)
    assert bad.returncode == 2 and "argument --variants: unknown ['sag_fast']; choose from cfg, cfg_joined" in bad.stderr
