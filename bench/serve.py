"""Scenario "serve": `sagfast serve` under closed-loop load, three batching policies side by side.

    python -m bench serve [--quick] [--concurrency 1,2,4,8] [--requests 32] [--out DIR]

Each policy runs its own local server (Ray Serve, the embedded digit UNet, 127.0.0.1, on the device
of the run) and takes, at each concurrency C, a closed loop: C clients, each sending its next request
as soon as its last is answered, `--requests` requests in all (bounded, each with a client timeout):

  (a) no batching          --max-batch-size 1: one request per model call
  (b) identical settings   --group-by settings: only requests whose guidance settings are all equal
                           share a call (what other serving engines do: guidance_scale in the batch key)
  (c) sagfast mixed        --group-by shape: requests of one model, steps, size and mode share a call
                           whatever their guidance settings (sagfast's per-image settings)

The request mix (the same sequence for every policy, seed 0): digit label uniform on 0..9, seed
uniform, 10 steps, exact mode, guidance_scale uniform on {1, 3, 5, 7.5}, sag_scale on {0, 0.5, 0.75,
1}, pag_scale on {0, 1, 3}: 48 equally likely settings. Reported per policy and C: throughput
(images/s: requests / wall time of the loop), latency p50/p95/p99 (client side, ms), the mean
requests per model call, and any non-200 answers.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request

from bench import common

POLICIES = {
    "none": ("(a) no batching", dict(max_batch_size=1, group_by="shape")),
    "identical": ("(b) identical settings only", dict(group_by="settings")),
    "mixed": ("(c) sagfast mixed settings", dict(group_by="shape")),
}
GUIDANCE = (1.0, 3.0, 5.0, 7.5)
SAG = (0.0, 0.5, 0.75, 1.0)
PAG = (0.0, 1.0, 3.0)


def request_mix(count: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [
        dict(
            model="digits-unet",
            label=rng.randrange(10),
            seed=rng.randrange(2**31),
            steps=10,
            guidance_scale=rng.choice(GUIDANCE),
            sag_scale=rng.choice(SAG),
            pag_scale=rng.choice(PAG),
        )
        for _ in range(count)
    ]


def _post(url: str, body: dict, timeout: float) -> tuple:
    request = urllib.request.Request(url + "/v1/images", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
            return response.status, time.perf_counter() - start, answer.get("batch_size", 0)
    except urllib.error.HTTPError as e:
        return e.code, time.perf_counter() - start, 0


def closed_loop(url: str, bodies: list, clients: int, timeout: float = 120.0) -> dict:
    """`clients` clients share the list `bodies`: each takes the next one when its last is answered."""
    queue = list(reversed(bodies))
    lock = threading.Lock()
    results = []

    def client():
        while True:
            with lock:
                if not queue:
                    return
                body = queue.pop()
            results.append(_post(url, body, timeout))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - start
    ok = [r for r in results if r[0] == 200]
    latencies = sorted(r[1] * 1e3 for r in ok)

    def pct(q):
        return latencies[min(len(latencies) - 1, int(round(q * (len(latencies) - 1))))] if latencies else None

    return {
        "images_per_s": len(ok) / wall,
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_batch": statistics.mean(r[2] for r in ok) if ok else None,
        "errors": len(results) - len(ok),
        "wall_s": wall,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(opts, record: dict, log=common.log) -> dict:
    from sagfast.serving import start, stop
    from sagfast.serving.schema import Limits

    levels = opts.concurrency or ([1, 4, 8] if opts.quick else [1, 2, 4, 8, 16])
    count = opts.requests or (24 if opts.quick else 64)
    bodies = request_mix(count)
    gpus = 1.0 if opts.device.type == "cuda" else 0.0
    rows = []
    for key, (label, policy) in POLICIES.items():
        limits = Limits(
            max_steps=50, max_batch_size=policy.get("max_batch_size", 8), batch_wait_ms=10.0, max_queue=64, group_by=policy["group_by"]
        )
        log(f"serve: {label}: starting a local server ...")
        url = start({"digits-unet": "embedded"}, limits, port=_free_port(), gpus_per_replica=gpus)
        try:
            closed_loop(url, request_mix(4, seed=1), 2)  # warm-up
            for clients in levels:
                log(f"serve: {label}, {clients} clients, {count} requests")
                rows.append(
                    {
                        "policy": label,
                        "key": key,
                        "clients": clients,
                        "requests": count,
                        **closed_loop(url, bodies, clients),
                        "status": "ok",
                    }
                )
        finally:
            stop()
    by = {(r["key"], r["clients"]): r for r in rows}
    for r in rows:
        base = by.get(("identical", r["clients"]))
        r["x_identical"] = r["images_per_s"] / base["images_per_s"] if base and base["images_per_s"] else None
    notes = [
        f"Closed loop, {count} requests per level, the embedded digit UNet (10 DDIM steps, 32x32), one replica on "
        f"{'CUDA' if gpus else 'CPU'}, max batch 8, batch wait 10 ms; the request mix: label, seed uniform; guidance_scale "
        f"on {GUIDANCE}, sag_scale on {SAG}, pag_scale on {PAG} (48 settings, equally likely).",
        "x identical: throughput over (b)'s at the same concurrency. mean batch: requests per model call, as the answers report it.",
    ]
    return {
        "title": "Serving under closed-loop load",
        "rows": rows,
        "notes": notes,
        "columns": [
            ("policy", "policy"),
            ("clients", "clients"),
            ("images_per_s", "images/s"),
            ("p50_ms", "p50 ms"),
            ("p95_ms", "p95 ms"),
            ("p99_ms", "p99 ms"),
            ("mean_batch", "mean batch"),
            ("x_identical", "x identical"),
            ("errors", "errors"),
            ("status", "status"),
        ],
        "plots": [("serve.png", lambda plt: _plot(plt, rows))],
    }


def _plot(plt, rows):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, (label, _) in POLICIES.items():
        mine = [r for r in rows if r["key"] == key]
        left.plot([r["clients"] for r in mine], [r["images_per_s"] for r in mine], marker="o", label=label)
        right.plot([r["clients"] for r in mine], [r["p95_ms"] for r in mine], marker="o", label=label)
    left.set(xlabel="concurrent clients", ylabel="images/s", title="throughput")
    right.set(xlabel="concurrent clients", ylabel="p95 latency (ms)", title="p95 latency")
    left.legend()
    fig.tight_layout()
    return fig
