"""attention_mass never materializes the N x N map: its peak memory is O(B*H*N), checked on CPU.

Measured as bench/kernels.py does (peak RSS a call adds, in a fresh process with glibc's mmap
threshold fixed so freed buffers return to the OS); the same process measures a reference that
materializes the softmax map, which shows the method sees an N x N allocation when there is one.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from sagfast.ops import _cpp, _triton

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, H, N, D = 1, 4, 2048, 64
MAP_BYTES = B * H * N * N * 4  # 64 MiB of fp32

WORKER = r"""
import json, sys, torch
from bench.kernels import _cpu_peak, attention_mass_inputs, materialized_mass
from sagfast import ops
torch.set_num_threads(1)
q, k, lse, scale = attention_mass_inputs(tuple(json.loads(sys.argv[1])), torch.device("cpu"), torch.float32)
out = {}
for name in sys.argv[2:]:
    fn = (lambda: materialized_mass(q, k, lse, scale)) if name == "map" else (
        lambda: ops.attention_mass(q, k, lse, scale, backend=name, threshold=1.0))
    fn()  # warm up: code paths, lazy loads
    out[name] = _cpu_peak(fn)
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs (peak RSS reset)")
def test_attention_mass_peak_memory_is_linear_in_n():
    cpu = torch.empty(0)  # measured on CPU tensors, also on a GPU machine
    why_not = {"triton": _triton.available() or _triton.device_reasons(cpu), "cpp": _cpp.available() or _cpp.device_reasons(cpu)}
    backends = [name for name, why in why_not.items() if not why]
    if not backends:
        pytest.skip("no kernel backend here")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps([B, H, N, D]), "map", *backends],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    print({k: f"{v / 2**20:.2f} MiB" for k, v in peaks.items()})
    assert peaks["map"] >= 0.9 * MAP_BYTES  # the method sees the map when it exists
    for name in backends:
        # O(B*H*N) state (the [B, H, N] per-head sums: 32 KiB here) plus bounded tiles; the
        # interpreter adds copies of its arguments. Far below the 64 MiB map either way.
        assert peaks[name] < MAP_BYTES / 8, (name, peaks[name])


VIDEO_WORKER = r"""
import json, sys, torch
from bench.kernels import _cpu_peak
from sagfast import ops
from sagfast.attention.lse import sdpa_with_lse
torch.set_num_threads(1)
b, h, n, d = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(b, n, h, d, generator=g).transpose(1, 2) for _ in range(3))  # the processor's layout
scale = d**-0.5

def capture():  # what the capture layer runs: the output with its log-sum-exp, then the mass and mask
    out, lse = sdpa_with_lse(q, k, v, scale)
    return out, ops.attention_mass(q, k, lse.float(), scale, backend="cpp", threshold=1.0)

capture()
print(json.dumps({"peak": _cpu_peak(capture)}))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs (peak RSS reset)")
def test_the_capture_at_wan_480p_stays_linear_in_n():
    # Wan 2.1 at 81 frames, 480x832: 21 latent frames x (60 / 2) x (104 / 2) = 32,760 tokens; one head's
    # dense map would be 4 GiB of fp32. One head of dim 16 keeps the run to seconds on a CPU.
    if _cpp.available() or _cpp.device_reasons(torch.empty(0)):
        pytest.skip("the C++ ops are not built here")
    b, h, n, d = 1, 1, 21 * 30 * 52, 16
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", VIDEO_WORKER, json.dumps([b, h, n, d])], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    peak = json.loads(done.stdout.strip().splitlines()[-1])["peak"]
    linear = b * h * n * (d + 2) * 4  # the output, the lse and the mass in fp32: 2.4 MiB
    print(f"capture peak {peak / 2**20:.2f} MiB; dense map {b * h * n * n * 4 / 2**30:.1f} GiB")
    assert peak < 8 * linear  # O(B * H * N): a few buffers of the output's size, never an N x N map
