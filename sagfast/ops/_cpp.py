"""The C++ ops (csrc/, built by setup.py as sagfast._C): loading, and their fake implementations.

`import sagfast._C` runs the library's TORCH_LIBRARY(sagfast, ...) registrations, which define
torch.ops.sagfast.{attention_mass, degrade, combine} with CPU kernels (and CUDA kernels when the
extension was built against a CUDA torch). The fake (meta) implementations below let torch.compile
trace them as single ops and let CUDA-graph capture see one opaque call each.
"""

from __future__ import annotations

import torch


def _load() -> str | None:
    try:
        import sagfast._C  # noqa: F401
    except ImportError as e:
        return (
            f"the C++ extension sagfast._C is not built ({e}); build it with "
            "`pip install --no-build-isolation -e .` (see README: Building the C++ ops)"
        )
    _register_fakes()
    return None


def _has_kernel(device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("sagfast::degrade", key)


def _load_error() -> str | None:
    return _LOAD_ERROR


def available() -> list[str]:
    why = _load_error()
    return [why] if why else []


def has_kernel(device_type: str) -> bool:
    """Whether the loaded library has kernels for this device type ("cpu", "cuda")."""
    return not _load_error() and _KERNELS.get(device_type, False)


def device_reasons(*tensors) -> list[str]:
    for t in tensors:
        if not has_kernel(t.device.type):
            return [f"sagfast._C has no {t.device.type} kernels (CUDA kernels are built only with a CUDA toolkit and a CUDA torch)"]
    return []


def _register_fakes() -> None:
    @torch.library.register_fake("sagfast::attention_mass")
    def _attention_mass_fake(q, k, lse, scale, threshold):
        b, _, n, _ = q.shape
        return q.new_empty((b, n), dtype=torch.float32), q.new_empty((b, n), dtype=torch.bool)

    @torch.library.register_fake("sagfast::degrade")
    def _degrade_fake(x0, mask, eps, abar, kernel_size, sigma):
        return torch.empty_like(x0, memory_format=torch.contiguous_format)

    @torch.library.register_fake("sagfast::combine")
    def _combine_fake(o, pos, neg, scales):
        return torch.empty_like(o, memory_format=torch.contiguous_format)


# Loaded at import, not on first use: torch.compile traces the dispatch, and a library load or a
# fake registration inside a traced function is a graph break.
_LOAD_ERROR = _load()
_KERNELS = {} if _LOAD_ERROR else {d: _has_kernel(d) for d in ("cpu", "cuda")}
