"""Scenario "memory": peak memory of the attention-map computation, diffusers' SAG against sagfast.

One self-attention layer with B=1 sample, H=8 heads of dim 40 (the shape of SD 1.5's highest-resolution
attention layers) and N = 1024, 4096, 16384 tokens (SD 1.5 at 256/512/1024 px in that layer; SDXL's mid
block has 1024 tokens at 1024 px and 4096 at 2048 px). Inputs q, k, v exist before measuring; what is
measured is the extra peak of computing the layer output plus the SAG mask, three ways:

  diffusers   what diffusers' StableDiffusionSAGPipeline does: its store processor takes the probabilities
              from `Attention.get_attention_scores` (baddbmm + softmax: the N x N map per head), multiplies
              by v, and the pipeline reduces the stored map with `.mean(1).sum(1) > 1.0`
  sagfast     `sdpa_with_lse` (the layer output and the per-row log-sum-exp from SDPA) then
              `sagfast.ops.attention_mass` and `> 1.0`: O(B*H*N) plus one bounded tile; as "auto"
              picks the backend, then each backend explicitly (sagfast[torch], [cpp], [triton]; one
              that is not built or refuses the device is listed as skipped)
  sdpa        the stock layer without SAG (`F.scaled_dot_product_attention`): the baseline

Measurement: on CUDA, `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the
allocated bytes before the call. On CPU, the process's resident-set high-water mark: VmHWM from
/proc/self/status, reset just before the call by writing 5 to /proc/self/clear_refs, minus VmRSS before
the call (glibc's mmap threshold is pinned to 128 KiB with mallopt so that freed buffers go back to the
OS between measurements). A case whose analytic size does not fit in half the available memory is not
run: its row gives the analytic size, labelled "analytic".

Under CFG diffusers materializes the map for both halves of the batch (x2 over these figures); sagfast
runs the mass only on the guide half.
"""

from __future__ import annotations

import ctypes
import gc

import torch
import torch.nn.functional as F

from bench import common

HEADS, HEAD_DIM, BATCH = 8, 40, 1
VIDEO_TOKENS = {32760: "Wan 480p, 81 frames: 21 x 30 x 52", 75600: "Wan 720p, 81 frames: 21 x 45 x 80"}
"""Video capture layers' N (latent frames x h x w after Wan's (1, 2, 2) patching): with `--tokens`
these run sagfast and SDPA only (the dense map, 4 GiB per head at 480p, is given analytically)."""
SAGFAST_BACKENDS = ("torch", "cpp", "triton")
TILE_BYTES = (1 << 23) * 4  # sagfast.ops.attention_mass: one fp32 tile of at most 2**23 elements


def _pin_malloc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so big buffers are mmapped and unmapped on free
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        return True
    except Exception:
        return False


def cpu_peak_supported() -> str | None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        common.status_kib("VmHWM")
        return None
    except Exception as exc:
        return f"no resettable RSS high-water mark here ({type(exc).__name__}: {exc})"


def measure_peak(fn, device) -> int:
    """Extra bytes at the peak of fn() over what was allocated before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    base = common.status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = fn()
    peak = (common.status_kib("VmHWM") - base) * 1024
    del out
    return max(peak, 0)


def _refuses(fn) -> str | None:
    """Why an explicitly requested backend does not run here (None when it does)."""
    try:
        with torch.inference_mode():
            fn()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).split('cannot run these inputs: ', 1)[-1]}"


def analytic(variant: str, n: int, elt: int, heads: int = HEADS, head_dim: int = HEAD_DIM) -> int:
    bh = BATCH * heads
    out = bh * n * head_dim * elt
    if variant.startswith("sagfast[") and variant != "sagfast[torch]":
        # a tiled kernel: output + lse + fp32 mass, no tile worth counting
        return out + 2 * bh * n * 4
    if variant == "diffusers":
        # baddbmm scores and softmax probabilities alive together (2 maps), then the head mean (1/H map)
        return 2 * bh * n * n * elt + BATCH * n * n * elt + out
    if variant in ("sagfast", "sagfast[torch]"):
        # (for "auto" this is the worst case: the torch reference) output + lse + fp32 mass accumulator + up to three fp32 tiles alive (scores, scores - lse, exp)
        return out + 2 * bh * n * 4 + 3 * min(TILE_BYTES, bh * n * n * 4)
    return out


def run(opts, record: dict, log=common.log) -> dict:
    from diffusers.models.attention_processor import Attention

    from sagfast.attention.lse import sdpa_with_lse
    from sagfast.ops import attention_mass

    device, dtype = opts.device, opts.dtype
    elt = torch.tensor([], dtype=dtype).element_size()
    tokens = opts.tokens or ([1024, 4096] if opts.quick else [1024, 4096, 16384])
    if opts.quick and not opts.tokens:
        shown = [1024, 4096, 16384]  # 16384 analytic only
    else:
        shown = tokens
    notes = []
    if device.type == "cpu":
        pinned = _pin_malloc()
        why = cpu_peak_supported()
        record["settings"]["malloc_pinned"] = pinned
        method = "RSS high-water mark (VmHWM reset via /proc/self/clear_refs) minus RSS before"
        if why:
            notes.append(f"CPU peaks not measurable: {why}; analytic sizes only")
            tokens = []
    else:
        method = "torch.cuda.max_memory_allocated minus allocated before"
    heads, head_dim = opts.heads or HEADS, opts.head_dim or HEAD_DIM
    attn = Attention(query_dim=heads * head_dim, heads=heads, dim_head=head_dim).to(device, dtype)
    scale = attn.scale

    def diffusers_way(q3, k3, v3):
        probs = attn.get_attention_scores(q3, k3, None)  # [B*H, N, N]
        out = torch.bmm(probs, v3)
        n = probs.shape[-1]
        mask = probs.reshape(BATCH, heads, n, n).mean(1, keepdim=False).sum(1, keepdim=False) > 1.0
        return out, mask

    def sagfast_way(q, k, v, backend="auto"):
        out, lse = sdpa_with_lse(q, k, v, scale)
        mask = attention_mass(q, k, lse, scale, backend=backend) > 1.0
        return out, mask

    def sdpa_way(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    rows = []
    for n in shown:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(BATCH, heads, n, head_dim, generator=g).to(device, dtype) for _ in range(3))
        q3, k3, v3 = (t.reshape(BATCH * heads, n, head_dim) for t in (q, k, v))
        dense = BATCH * heads * n * n * elt
        cases = [("sdpa", lambda: sdpa_way(q, k, v)), ("sagfast", lambda: sagfast_way(q, k, v))]
        for be in SAGFAST_BACKENDS:
            cases.append((f"sagfast[{be}]", lambda be=be: sagfast_way(q, k, v, be)))
        cases.append(("diffusers", lambda: diffusers_way(q3, k3, v3)))
        if n in VIDEO_TOKENS:  # the auto-picked backend only: each run is seconds to minutes on a CPU
            cases = [case for case in cases if case[0] in ("sdpa", "sagfast", "diffusers")]
        for variant, fn in cases:
            need = analytic(variant, n, elt, heads, head_dim)
            if device.type == "cuda":
                free = torch.cuda.mem_get_info(device)[0]
                budget = int(0.8 * free)
            else:
                free = common.mem_available_bytes() or 0
                budget = int(0.5 * free)
            row = {
                "N": n,
                "shape": VIDEO_TOKENS.get(n, ""),
                "variant": variant,
                "dense_map_MiB": dense / 2**20,
                "analytic_MiB": need / 2**20,
            }
            if variant.startswith("sagfast[") and n in tokens:
                why = _refuses(fn)
                if why:
                    row.update(status=f"skipped: {why}")
                    rows.append(row)
                    continue
            if n not in tokens:
                row.update(peak_MiB=need / 2**20, source="analytic", status="not run (--quick)")
            elif need * 1.2 > budget:
                row.update(
                    peak_MiB=need / 2**20,
                    source="analytic",
                    status=f"not run: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available",
                )
            else:
                log(f"memory: N={n} {variant} ...")
                with torch.inference_mode():
                    fn()  # warm-up: lazy init, thread pools
                    peak = measure_peak(fn, device)
                row.update(peak_MiB=peak / 2**20, source="measured", status="ok")
            rows.append(row)
        q = k = v = q3 = k3 = v3 = None  # frees the inputs (the cases above held them)
        gc.collect()
    by = {(r["N"], r["variant"]): r for r in rows}
    for r in rows:
        base = by.get((r["N"], "sagfast"))
        if r["variant"] == "diffusers" and base and base["peak_MiB"]:
            r["x_sagfast"] = r["peak_MiB"] / base["peak_MiB"]
    notes += [
        f"B={BATCH}, H={heads}, head dim {head_dim}, {str(dtype).replace('torch.', '')}; peak = {method}.",
        "dense map: one B x H x N x N map in the compute dtype; diffusers holds two at its peak (scores and "
        "probabilities) and, under CFG, for both halves of the batch.",
        "sagfast's torch reference backend bounds its score tile at 2**23 fp32 elements (32 MiB; up to 3 such "
        "temporaries alive), so its peak is flat in N (and above diffusers' at N=1024, where the whole map is 32 MiB).",
        "analytic rows were not run (the size is computed, not measured).",
    ]
    return {
        "title": "Peak memory of the attention-map computation",
        "rows": rows,
        "notes": notes,
        "raw": {"method": method},
        "columns": [
            ("N", "N tokens"),
            ("shape", "video latent (t x h x w)"),
            ("variant", "variant"),
            ("peak_MiB", "peak MiB"),
            ("source", "source"),
            ("dense_map_MiB", "one dense map MiB"),
            ("x_sagfast", "x sagfast"),
            ("status", "status"),
        ],
        "plots": [("memory.png", lambda plt: _plot(plt, rows))],
    }


def _plot(plt, rows):
    fig, ax = plt.subplots(figsize=(6, 4))
    palette = (
        ("diffusers", "tab:red"),
        ("sagfast", "tab:blue"),
        ("sagfast[torch]", "tab:cyan"),
        ("sagfast[cpp]", "tab:green"),
        ("sagfast[triton]", "tab:purple"),
        ("sdpa", "tab:gray"),
    )
    for variant, color in palette:
        rs = [r for r in rows if r["variant"] == variant and r.get("peak_MiB") is not None]
        if not rs:
            continue
        xs = [r["N"] for r in rs]
        ys = [max(r["peak_MiB"], 1e-3) for r in rs]
        ax.plot(xs, ys, "-", color=color, label=variant)
        for x, y, r in zip(xs, ys, rs):
            ax.plot([x], [y], "o" if r["source"] == "measured" else "x", color=color)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens N in the capture layer")
    ax.set_ylabel("peak extra memory (MiB); o measured, x analytic")
    ax.set_title("attention map: diffusers SAG vs sagfast")
    ax.legend()
    return fig
