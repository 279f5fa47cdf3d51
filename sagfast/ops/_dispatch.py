"""One dispatch rule for every op.

Each op lists its backends in a fixed tuple, fastest first (Triton on CUDA tensors, the C++ op, the
PyTorch reference). "auto" takes the first whose `available()` and `supports(inputs)` give no reasons;
an explicitly requested backend never falls back: it raises with its reasons.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    available: Callable[[], list]
    """Reasons the backend cannot run on this machine at all (empty when it can)."""
    supports: Callable[..., list]
    """Reasons it refuses these inputs (empty when it takes them)."""
    run: Callable


class BackendUnsupported(RuntimeError):
    pass


def reasons(backend: Backend, inputs: Sequence) -> list:
    return list(backend.available()) or list(backend.supports(*inputs))


def check_requested(name: str, backends: Sequence[Backend], requested: str) -> None:
    names = [b.name for b in backends]
    if requested != "auto" and requested not in names:
        raise ValueError(f"{name}: unknown backend {requested!r}; accepted: 'auto', " + ", ".join(repr(n) for n in names))


def dispatch(name: str, backends: Sequence[Backend], requested: str, inputs: Sequence) -> Callable:
    check_requested(name, backends, requested)
    if requested != "auto":
        backend = next(b for b in backends if b.name == requested)
        why = reasons(backend, inputs)
        if why:
            raise BackendUnsupported(f"{name}: backend {requested!r} cannot run these inputs: " + "; ".join(why))
        return backend.run
    refused = []
    for backend in backends:
        why = reasons(backend, inputs)
        if not why:
            return backend.run
        refused.append(f"{backend.name}: " + "; ".join(why))
    raise BackendUnsupported(f"{name}: no backend takes these inputs: " + " | ".join(refused))
