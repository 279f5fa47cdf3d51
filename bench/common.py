"""What every scenario shares: the machine record, interleaved timing, summaries and the writers.

Timing rules (docs/design.md, "Test conventions"):
- every variant of a scenario is timed in one process, interleaved A B C A B C ... for `rounds` rounds
  after `warmup` untimed rounds, so that drift (thermal state, other processes on a shared machine)
  hits all variants alike;
- a variant's figure is the median over rounds, with the spread (p25-p75, min, max) next to it;
- every ratio is computed within the run, round by round (variant_r / base_r), and reported as the
  median of those paired ratios;
- on CUDA, timing uses CUDA events recorded on the current stream and synchronizes before reading
  them; on CPU, time.perf_counter.
"""

from __future__ import annotations

import csv
import datetime
import importlib
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------
# Machine record
# ----------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def _meminfo_bytes(field: str) -> int | None:
    """A /proc/meminfo field in bytes (None where there is no /proc)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _mem_total_gib() -> float | None:
    total = _meminfo_bytes("MemTotal")
    return None if total is None else round(total / 2**30, 1)


def mem_available_bytes() -> int | None:
    return _meminfo_bytes("MemAvailable")


def sagfast_backends() -> dict:
    """For each op, each backend's availability on this machine ("ok" or its reasons)."""
    found = {}
    for op in ("attention_mass", "degrade", "combine"):
        try:
            mod = importlib.import_module(f"sagfast.ops.{op}")
            found[op] = {b.name: ("; ".join(map(str, b.available())) or "ok") for b in getattr(mod, "BACKENDS", ())}
        except Exception as exc:  # a module being rewritten by someone else must not stop a benchmark
            found[op] = f"error: {type(exc).__name__}: {exc}"
    return found


def machine_record(device: torch.device, dtype: torch.dtype, settings: dict) -> dict:
    """Everything needed to read a result file later: machine, versions, dtype, settings."""
    import sagfast

    cuda = device.type == "cuda"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    rec = {
        "when_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "ram_gib": _mem_total_gib(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1) if cuda else None,
        "gpu_driver": _nvidia_driver() if cuda else None,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "versions": {
            "torch": torch.__version__,
            "triton": _version("triton"),
            "diffusers": _version("diffusers"),
            "transformers": _version("transformers"),
            "sagfast": getattr(sagfast, "__version__", None),
            "sagfast_git": _git("rev-parse", "--short", "HEAD"),
            "sagfast_git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        },
        "sagfast_backends": sagfast_backends(),
        "dtype": str(dtype).replace("torch.", ""),
        "settings": settings,
    }
    return rec


def finish_record(rec: dict) -> None:
    rec["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    la = rec.get("load_average_at_start") or [0]
    cores = rec.get("cpu_cores_usable") or 1
    if max(la[0], (rec["load_average_at_end"] or [0])[0]) > cores + 0.5:
        rec["noisy"] = (
            f"the machine was shared: load average {la[0]} at start, {rec['load_average_at_end'][0]} at end "
            f"on {cores} usable cores; absolute times are inflated, ratios (paired per round) less so"
        )


def machine_line(rec: dict) -> str:
    if rec.get("gpu_name"):
        return (
            f"{rec['gpu_name']} (driver {rec.get('gpu_driver')}, CUDA {rec.get('cuda_runtime')}), "
            f"host CPU {rec['cpu_model']}; torch {rec['versions']['torch']}, diffusers {rec['versions']['diffusers']}, "
            f"{rec['dtype']}"
        )
    return (
        f"CPU only: {rec['cpu_model']}, {rec['cpu_cores_usable']} cores, {rec['torch_threads']} torch threads, "
        f"{rec['ram_gib']} GiB RAM; torch {rec['versions']['torch']}, diffusers {rec['versions']['diffusers']}, "
        f"{rec['dtype']}"
    )


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device on this machine")
    return dev


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Marks points in a run (e.g. the end of each denoising step) and returns the intervals.

    CPU: perf_counter. CUDA: an event recorded on the current stream at each mark (no sync inside
    the run), read after one synchronize at the end.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list:
        """Seconds between consecutive marks."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def time_call(fn: Callable, device: torch.device, number: int = 1) -> float:
    """Seconds per call of `fn`, averaged over `number` back-to-back calls."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def timed(fn: Callable, device: torch.device, number: int | None = 1, min_sample_s: float = 0.02) -> Callable:
    """A self-timed variant: calling it returns seconds per call of `fn`. number=None calibrates the
    number of back-to-back calls per sample at the first call after warm-up (>= min_sample_s)."""
    state = {"number": number}

    def run(calibrate: bool = False):
        if state["number"] is None or calibrate:
            one = time_call(fn, device, 1)
            state["number"] = max(1, min(10000, math.ceil(min_sample_s / max(one, 1e-9))))
            return one
        return time_call(fn, device, state["number"])

    run.state = state
    return run


def interleave(
    variants: dict,
    rounds: int,
    warmup: int,
    log: Callable | None = None,
) -> dict:
    """Run self-timed variants (callables returning seconds) A B C A B C ...

    Returns {name: [seconds per round]}. A variant that raises is dropped with its error recorded
    under {name: {"error": ...}}; the others go on.
    """
    samples = {name: [] for name in variants}
    errors = {}
    for r in range(warmup + rounds):
        for name, fn in variants.items():
            if name in errors:
                continue
            try:
                value = fn()
            except Exception as exc:  # report, do not abort the whole scenario
                errors[name] = f"{type(exc).__name__}: {exc}"
                if log:
                    log(f"  {name}: FAILED {errors[name]}")
                continue
            if r >= warmup:
                samples[name].append(value)
            if log:
                tag = "warm-up" if r < warmup else f"round {r - warmup + 1}/{rounds}"
                log(f"  {tag} {name}: {value * 1e3:.3f} ms")
    out = {name: s for name, s in samples.items() if name not in errors}
    out.update({name: {"error": e} for name, e in errors.items()})
    return out


def quantile(values: Sequence[float], q: float) -> float:
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float], unit_scale: float = 1e3) -> dict:
    """median / p25 / p75 / min / max / n, scaled (default seconds -> ms)."""
    xs = [v * unit_scale for v in values]
    return {
        "median": statistics.median(xs),
        "p25": quantile(xs, 0.25),
        "p75": quantile(xs, 0.75),
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
    }


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> dict | None:
    """Median and range of the per-round ratios a_r / b_r (a and b from the same interleaved run)."""
    n = min(len(a), len(b))
    if n == 0:
        return None
    rs = [a[i] / b[i] for i in range(n) if b[i] > 0]
    if not rs:
        return None
    return {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}


# ----------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------


def _clean(obj):
    """JSON-safe: NaN/inf -> None, tuples -> lists, torch dtypes/devices -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.{digits}f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"
    return str(value)


def markdown_table(rows: list, columns: list) -> str:
    """columns: [(key, header)]; rows: dicts."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_results(out_dir: Path, scenario: str, result: dict, columns: list, title: str, notes: Sequence[str] = ()):
    """Writes DIR/<scenario>.json (everything), .csv (the rows) and .md (machine line, table, notes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    finish_record(result["machine"])
    clean = _clean(result)
    json_path = out_dir / f"{scenario}.json"
    json_path.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")

    rows = clean.get("rows", [])
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
    (out_dir / f"{scenario}.csv").write_text(buf.getvalue())

    md = [f"### {title}", "", f"Machine: {machine_line(result['machine'])}.", ""]
    if result["machine"].get("noisy"):
        md += [f"Note: {result['machine']['noisy']}.", ""]
    md += [markdown_table(rows, columns), ""]
    md += [f"- {n}" for n in list(result.get("notes", [])) + list(notes)]
    md.append("")
    md.append(f"Regenerate: `{result['machine']['settings'].get('command', 'python -m bench ' + scenario)}`")
    (out_dir / f"{scenario}.md").write_text("\n".join(md) + "\n")
    return json_path


def save_report(out_dir: Path, name: str, result: dict, text: str) -> None:
    """`name`.json (the result) and `name`.md (its table) under `out_dir`; the table is printed too."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"{name}.md").write_text(text + "\n")
    print(text)


def plot(out_path: Path, draw: Callable) -> str | None:
    """Calls draw(plt) with the Agg backend and saves; returns the path or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return str(out_path)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: resident high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def failed_rows(rows: list) -> list:
    """The rows of a scenario that failed: their status starts with "error" (a row skipped for a stated
    reason, such as no CUDA, is not a failure)."""
    return [r for r in rows if str(r.get("status", "")).startswith("error")]


def variant_status(row: dict, key: str, samples: dict, skipped: dict):
    """(row, summary) for one variant of an interleaved run: a skipped or failed variant gets its
    status and no summary; one that ran gets the summary of its samples; (None, None) if it never ran."""
    if key in skipped:  # a stated reason, or an "error: ..." found before the variant could run
        why = skipped[key]
        return dict(row, status=why if why.startswith("error") else f"skipped: {why}"), None
    s = samples.get(key)
    if s is None:
        return None, None
    if isinstance(s, dict):
        return dict(row, status=f"error: {s['error']}"), None
    return row, summarize(s)
