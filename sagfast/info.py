"""`python -m sagfast.info`: which ops backends run here and why not, versions, devices.

For each op and device, the backend "auto" picks for fp32 and fp16 inputs, and every backend's
reasons when it cannot run (the same reasons an explicit request raises with).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

import torch


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _probe_inputs(op: str, device: torch.device, dtype: torch.dtype):
    """Small inputs of one op, as the guided denoiser passes them."""
    if op == "attention_mass":
        q = torch.zeros(1, 2, 16, 64, device=device, dtype=dtype)
        return (q, q, torch.zeros(1, 2, 16, device=device), 0.125)
    if op == "degrade":
        x = torch.zeros(1, 4, 16, 16, device=device, dtype=dtype)
        return (x, torch.zeros(1, 2, 2, dtype=torch.bool, device=device), x, torch.ones(1, device=device), 9, 1.0)
    o = torch.zeros(2, 4, 8, 8, device=device, dtype=dtype)
    return (o, o[:1], o[1:], 0.75)


def backend_report(devices) -> list[str]:
    from sagfast.ops import _cpp, _triton
    from sagfast.ops._dispatch import BackendUnsupported, choose, reasons

    lines = []
    mods = {op: sys.modules.get(f"sagfast.ops.{op}") for op in ("attention_mass", "degrade", "combine")}
    for op, mod in mods.items():
        lines.append(f"{op}:")
        for device in devices:
            for dtype in (torch.float32, torch.float16):
                inputs = _probe_inputs(op, device, dtype)
                try:
                    picked = choose(op, mod.BACKENDS, "auto", inputs).name
                except BackendUnsupported as e:
                    picked = f"none ({e})"
                lines.append(f"  {device.type} {str(dtype).replace('torch.', '')}: auto -> {picked}")
                for b in mod.BACKENDS:
                    why = reasons(b, inputs)
                    if why:
                        lines.append(f"      {b.name}: no: " + "; ".join(why))
                    elif b.auto_skip(*inputs):
                        lines.append(f"      {b.name}: only on request: " + "; ".join(b.auto_skip(*inputs)))
    lines.append(
        "C++ extension (sagfast._C): "
        + ("; ".join(_cpp.available()) or ("loaded, kernels: " + ", ".join(d for d in ("cpu", "cuda") if _cpp.has_kernel(d))))
    )
    from sagfast.attention.lse import xformers_reasons

    for device in devices:
        why = xformers_reasons(torch.empty(0, device=device))
        lines.append(
            f"capture layer output + lse on {device.type}: "
            + (f"SDPA ({'; '.join(why)})" if why else "xformers when the layer uses xformers, else SDPA")
        )
    lines.append(
        "Triton: "
        + ("; ".join(_triton.available()) or "importable")
        + (", interpreter on (TRITON_INTERPRET=1)" if _triton.interpreting() else "")
    )
    return lines


def report() -> str:
    import sagfast  # noqa: F401  (registers the ops)
    import sagfast.ops  # noqa: F401

    lines = [
        f"sagfast {_version('sagfast')} (from {os.path.dirname(sagfast.__file__)})",
        f"python {platform.python_version()} on {platform.platform()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}), triton {_version('triton')}, "
        f"diffusers {_version('diffusers')}, transformers {_version('transformers')}, xformers {_version('xformers')}",
        f"CPU: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
    ]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}")
        devices.append(torch.device("cuda"))
    else:
        lines.append("CUDA: no device")
    return "\n".join(lines + backend_report(devices))


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
