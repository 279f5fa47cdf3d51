"""Kernel benchmark: each op per backend against its PyTorch reference, time and peak memory per shape.

    python -m bench.kernels [--quick] [--video] [--device cpu|cuda]   # a table on stdout (+ JSON with --json)
    python -m bench kernels                                   # the same rows through the bench CLI

`run(quick)` returns rows {op, backend, shape, dtype, device, ms, p25_ms, p75_ms, speedup_vs_ref,
peak_bytes, ...}. Timing follows bench/common.py: the variants of one (op, shape) are interleaved
round by round, the figure is the median, and the speedup is the median of the per-round ratios
reference / backend from the same run. On CUDA, rows also carry achieved GB/s (compulsory bytes: each
input read once, the output written once) against the device's nominal bandwidth; attention_mass,
which is compute bound, also carries TFLOP/s of its q.k products.

Peak memory:
- CUDA: torch.cuda.max_memory_allocated() above the allocation before the call (reset before it).
- CPU: there is no allocator counter, so each measurement runs in one fresh worker process started
  with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_=65536: every buffer of 64 KiB
  or more is its own mapping, returned to the OS when freed). Before a call the worker resets the
  kernel's peak-RSS counter (writing 5 to /proc/self/clear_refs), then reads VmHWM - VmRSS after it:
  the peak resident memory the call added, scratch buffers inside C++ ops included (what a
  tracemalloc or dispatcher-level count would miss). A calibration row (a 64 MiB tensor written once)
  shows the method reads what it should.
The memory rows compare attention_mass at N = 4096, H = 8, B = 2 with a reference that materializes
the softmax map ([B, H, N, N] fp32, as diffusers' SAG does) and with sagfast's tiled reference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from bench import common

# Nominal DRAM bandwidth, bytes/s, by a substring of the device name: the vendors' published figures
# (H100 SXM HBM3 3.35 TB/s, H200 HBM3e 4.8 TB/s, A100 80GB HBM2e 2.0 TB/s).
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}

MEMORY_SHAPE = (2, 8, 4096, 64)  # B, H, N, D: where materializing the map hurts

VIDEO_TOKENS = (32760, 75600)
"""Wan 2.1 at 81 frames: 21 x 30 x 52 tokens at 480x832, 21 x 45 x 80 at 720x1280 (`--video`)."""


def video_shape(n: int, device: torch.device) -> tuple:
    """The attention mass's shape at video N: Wan 2.1 1.3B's layer (12 heads of 128) on CUDA; one head
    of 16 on CPU (the cost scales with heads x head dim; a 2-core CPU takes seconds per call even so)."""
    return (1, 12, n, 128) if device.type == "cuda" else (1, 1, n, 16)


# ----------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------


def _rand(shape, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def attention_mass_inputs(shape, device, dtype):
    from sagfast.attention.lse import sdpa_with_lse

    b, h, n, d = shape
    # The layout the capture processor passes: [B, N, H, D] viewed as [B, H, N, D].
    q = _rand((b, n, h, d), device, dtype, 1).transpose(1, 2)
    k = _rand((b, n, h, d), device, dtype, 2).transpose(1, 2)
    scale = d**-0.5
    with torch.inference_mode():
        _, lse = sdpa_with_lse(q, k, k, scale)
    return q, k, lse.float(), scale


def materialized_mass(q, k, lse, scale):
    """What diffusers' SAG does: the full softmax map [B, H, N, N], then its column sums."""
    p = torch.softmax(torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale, dim=-1)
    return p.sum(dim=2).mean(dim=1)


def cases(quick: bool, device: torch.device, dtype: torch.dtype, video: bool = False) -> list:
    """(op, shape label, inputs builder, {variant: fn(inputs)}, bytes moved, flops). `video`: the
    attention mass at Wan's video N as well."""
    from sagfast import ops

    itemsize = torch.empty(0, dtype=dtype).element_size()
    out = []
    mass_shapes = [(1, 8, 64, 160), (1, 20, 1024, 64)]  # SD1.5 mid block, SDXL mid block
    if not quick or device.type == "cuda":
        mass_shapes.append(MEMORY_SHAPE)
    if video:
        mass_shapes += [video_shape(n, device) for n in VIDEO_TOKENS]
    for shape in mass_shapes:
        b, h, n, d = shape
        out.append(
            dict(
                op="attention_mass",
                shape="B{} H{} N{} D{}".format(*shape),
                inputs=lambda shape=shape: attention_mass_inputs(shape, device, dtype),
                call=lambda inp, backend: ops.attention_mass(*inp, backend=backend, threshold=1.0),
                bytes=2 * b * h * n * d * itemsize + b * h * n * 4 + b * n * 5,
                flops=2.0 * b * h * n * n * d,
            )
        )
    lat = [(1, 4, 64, 64, 8, 8), (1, 4, 128, 128, 32, 32)]  # SD1.5 512 (map 8x8), SDXL 1024 (map 32x32)
    for b, c, hh, ww, mh, mw in lat:

        def deg_inputs(b=b, c=c, hh=hh, ww=ww, mh=mh, mw=mw):
            x0 = _rand((b, c, hh, ww), device, dtype, 3)
            eps = _rand((b, c, hh, ww), device, dtype, 4)
            mask = _rand((b, mh, mw), device, torch.float32, 5) > 0
            return x0, mask, eps, torch.full((b,), 0.5, device=device)

        out.append(
            dict(
                op="degrade",
                shape=f"B{b} C{c} {hh}x{ww} map {mh}x{mw}",
                inputs=deg_inputs,
                call=lambda inp, backend: ops.degrade(*inp, 9, 1.0, backend=backend),
                bytes=3 * b * c * hh * ww * itemsize + b * mh * mw,
                flops=None,
            )
        )

        def comb_inputs(b=b, c=c, hh=hh, ww=ww):
            o = _rand((2 * b, c, hh, ww), device, dtype, 6)
            return o, o[:b], _rand((b, c, hh, ww), device, dtype, 7)

        out.append(
            dict(
                op="combine",
                shape=f"CFG 2x{b} C{c} {hh}x{ww}",
                inputs=comb_inputs,
                call=lambda inp, backend: ops.combine(*inp, 0.75, backend=backend),
                bytes=6 * b * c * hh * ww * itemsize,
                flops=None,
            )
        )
    return out


def backends_for(device: torch.device) -> list:
    """The backends to time here: the reference always; Triton only on CUDA (the interpreter measures
    Python, not the kernel)."""
    from sagfast.ops import _cpp

    names = ["torch"]
    if not _cpp.available() and _cpp.has_kernel(device.type):
        names.append("cpp")
    if device.type == "cuda":
        names.append("triton")
    return names


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


def time_rows(quick: bool, device: torch.device, dtype: torch.dtype, video: bool = False) -> list:
    rows = []
    rounds, warmup = (5, 1) if quick else (15, 2)
    backends = backends_for(device)
    bw = next((v for k, v in BANDWIDTH.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
    for case in cases(quick, device, dtype, video):
        inp = case["inputs"]()
        heavy = case["flops"] is not None and case["flops"] > 1e10 and device.type == "cpu"
        variants = {}
        for name in backends:
            if case["op"] == "attention_mass" and name == "cpp" and device.type == "cuda":
                continue  # no CUDA C++ attention mass (docs/design.md, "The attention mass on CUDA")

            def fn(name=name, inp=inp):
                return case["call"](inp, name)

            variants[name] = common.timed(fn, device, number=1 if heavy else None)
        common.log(f"kernels: {case['op']} {case['shape']} ({', '.join(variants)})")
        samples = common.interleave(variants, rounds=3 if heavy else rounds, warmup=warmup)
        for name in backends:
            s = samples.get(name)
            row = dict(op=case["op"], backend=name, shape=case["shape"], dtype=str(dtype).replace("torch.", ""), device=device.type)
            if name not in variants:
                row["status"] = "skipped: the C++ attention mass runs on CPU only"
                rows.append(row)
                continue
            if isinstance(s, dict):
                row["status"] = f"error: {s['error']}"
                rows.append(row)
                continue
            summ = common.summarize(s)
            ratio = common.paired_ratio(samples["torch"], s) if isinstance(samples.get("torch"), list) else None
            row.update(
                ms=summ["median"],
                p25_ms=summ["p25"],
                p75_ms=summ["p75"],
                rounds=summ["n"],
                speedup_vs_ref=ratio["median"] if ratio else None,
            )
            if device.type == "cuda":
                sec = summ["median"] / 1e3
                row["gbps"] = case["bytes"] / sec / 1e9
                row["bw_frac"] = case["bytes"] / sec / bw if bw else None
                if case["flops"]:
                    row["tflops"] = case["flops"] / sec / 1e12
            rows.append(row)
        inp = None  # frees the inputs before the next case
    return rows


# ----------------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------------


def _cpu_peak(fn) -> int:
    """Peak resident bytes that fn() adds (see the module docstring)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = common.status_kib("VmRSS")
    result = fn()
    peak = common.status_kib("VmHWM")
    del result
    return (peak - base) * 1024


def _cuda_peak(fn, device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return peak - base


def memory_variants(device: torch.device, dtype: torch.dtype) -> list:
    """(op, backend label, shape label, builder of the inputs, fn(inputs))."""

    out = []
    for case in cases(False, device, dtype):
        for name in backends_for(device):
            out.append((case["op"], name, case["shape"], case["inputs"], lambda inp, c=case, n=name: c["call"](inp, n)))
        if case["op"] == "attention_mass" and case["shape"] == "B{} H{} N{} D{}".format(*MEMORY_SHAPE):
            out.append((case["op"], "materialized map", case["shape"], case["inputs"], lambda inp: materialized_mass(*inp)))
    return out


def measure_memory(device: torch.device, dtype: torch.dtype) -> list:
    """In this process: peak bytes per variant. On CPU call it only in a worker (see run_memory)."""
    rows = []
    if device.type == "cpu":

        def calib():
            t = torch.empty(64 << 20, dtype=torch.uint8)
            t.fill_(1)
            return t

        rows.append(dict(op="calibration", backend="64 MiB tensor", shape="-", peak_bytes=_cpu_peak(calib)))
    for op, name, shape, build, fn in memory_variants(device, dtype):
        inp = build()
        try:
            fn(inp)  # warm up: code paths, lazy library loads, dispatch cache
            peak = _cpu_peak(lambda: fn(inp)) if device.type == "cpu" else _cuda_peak(lambda: fn(inp), device)
            rows.append(dict(op=op, backend=name, shape=shape, peak_bytes=peak))
        except Exception as exc:
            rows.append(dict(op=op, backend=name, shape=shape, status=f"error: {type(exc).__name__}: {exc}"))
        inp = None  # frees the inputs before the next case
    return rows


def run_memory(device: torch.device, dtype: torch.dtype) -> list:
    if device.type == "cuda":
        return measure_memory(device, dtype)
    if not os.path.exists("/proc/self/clear_refs"):
        return [dict(op="memory", backend="-", shape="-", status="needs Linux /proc (VmHWM, clear_refs)")]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    name = {v: k for k, v in common.DTYPES.items()}[dtype]
    cmd = [sys.executable, "-m", "bench.kernels", "--memory-worker", "--dtype", name, "--threads", str(torch.get_num_threads())]
    done = subprocess.run(cmd, cwd=common.REPO, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return [dict(op="memory", backend="-", shape="-", status=f"error: memory worker failed: {done.stderr[-500:]}")]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------


def run(quick: bool, device: str | torch.device = "auto", dtype: torch.dtype | None = None, video: bool = False) -> list:
    """Rows of timings, then rows of peak memory (keys: op, backend, shape, dtype, device, ms, ...,
    peak_bytes). Quick: fewer rounds, and on CPU no timing at N = 4096 (memory is still measured).
    `video`: timings of the attention mass at Wan's N too (its memory: `bench memory --tokens`)."""
    device = common.pick_device(device) if not isinstance(device, torch.device) else device
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    rows = time_rows(quick, device, dtype, video)
    mem = {(r["op"], r["backend"], r["shape"]): r for r in run_memory(device, dtype)}
    for r in rows:
        m = mem.pop((r["op"], r["backend"], r["shape"]), None)
        if m is not None:
            r["peak_bytes"] = m.get("peak_bytes")
    for m in mem.values():  # memory-only rows: calibration, materialized map, shapes not timed
        rows.append(dict(dtype=str(dtype).replace("torch.", ""), device=device.type, **m))
    return rows


def _table(rows: list) -> str:
    cols = [
        "op",
        "backend",
        "shape",
        "dtype",
        "ms",
        "p25_ms",
        "p75_ms",
        "speedup_vs_ref",
        "peak_bytes",
        "gbps",
        "bw_frac",
        "tflops",
        "status",
    ]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if c == "peak_bytes" and v is not None:
                v = f"{v / 2**20:.2f} MiB"
            elif isinstance(v, float):
                v = f"{v:.3g}"
            cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--video", action="store_true", help="also the attention mass at Wan's video N (32760, 75600)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default=None)
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = common.pick_device(opts.device)
    dtype = common.DTYPES[opts.dtype] if opts.dtype else None
    if opts.memory_worker:
        print(json.dumps(measure_memory(device, dtype or torch.float32)))
        return 0
    rows = run(opts.quick, device, dtype, opts.video)
    try:
        print("# " + common.machine_line(common.machine_record(device, dtype or torch.float32, {})))
    except Exception as exc:  # the machine line is a convenience
        print(f"# (no machine line: {type(exc).__name__}: {exc})")
    print(f"# torch threads: {torch.get_num_threads()}; load average: {os.getloadavg()}")
    print(_table(rows))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
