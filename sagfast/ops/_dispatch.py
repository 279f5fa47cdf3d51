"""One dispatch rule for every op.

Each op lists its backends in a fixed tuple, fastest first (Triton on CUDA tensors, the C++ op, the
PyTorch reference). "auto" takes the first whose `available()` and `supports(inputs)` give no reasons
(and that does not ask "auto" to pass it over: the Triton interpreter on CPU tensors is for tests);
an explicitly requested backend never falls back: it raises with its reasons.

The choice is made once per (op, requested backend, dispatch key) and cached. Each op's key holds
everything its backends' `supports` look at (device, dtypes, head dim, ...; never the sizes that do not
matter), so a CUDA graph or `torch.compile` sees one fixed path for a given device, dtype and shape
class, and a step does not pay for the checks again. `clear_cache()` forgets the choices (tests that
change the environment use it).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Sequence


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    available: Callable[[], list]
    """Reasons the backend cannot run on this machine at all (empty when it can)."""
    supports: Callable[..., list]
    """Reasons it refuses these inputs (empty when it takes them)."""
    run: Callable
    auto_skip: Callable[..., list] = lambda *inputs: []
    """Reasons "auto" passes over it although an explicit request may use it (the Triton interpreter
    on CPU tensors: a test mode, far slower than any other backend)."""


class BackendUnsupported(RuntimeError):
    pass


_CACHE: dict = {}


def clear_cache() -> None:
    _CACHE.clear()


def reasons(backend: Backend, inputs: Sequence) -> list:
    return list(backend.available()) or list(backend.supports(*inputs))


def check_requested(name: str, backends: Sequence[Backend], requested: str) -> None:
    names = [b.name for b in backends]
    if requested != "auto" and requested not in names:
        raise ValueError(f"{name}: unknown backend {requested!r}; accepted: 'auto', " + ", ".join(repr(n) for n in names))


def choose(name: str, backends: Sequence[Backend], requested: str, inputs: Sequence) -> Backend:
    """The backend the rule picks for these inputs (uncached); raises BackendUnsupported with reasons."""
    check_requested(name, backends, requested)
    if requested != "auto":
        backend = next(b for b in backends if b.name == requested)
        why = reasons(backend, inputs)
        if why:
            raise BackendUnsupported(f"{name}: backend {requested!r} cannot run these inputs: " + "; ".join(why))
        return backend
    refused = []
    for backend in backends:
        why = reasons(backend, inputs) or list(backend.auto_skip(*inputs))
        if not why:
            return backend
        refused.append(f"{backend.name}: " + "; ".join(why))
    raise BackendUnsupported(f"{name}: no backend takes these inputs: " + " | ".join(refused))


def dispatch(name: str, backends: Sequence[Backend], requested: str, inputs: Sequence, key: Hashable = None) -> Callable:
    """`run` of the chosen backend. With a `key`, the choice is cached per (name, requested, key);
    refusals are never cached (they raise every time, with the reasons)."""
    if key is None:
        return choose(name, backends, requested, inputs).run
    ck = (name, requested, key)
    backend = _CACHE.get(ck)
    if backend is None:
        backend = choose(name, backends, requested, inputs)
        _CACHE[ck] = backend
    return backend.run


def cached_choice(name: str, requested: str, key: Hashable):
    """The cached backend name for (name, requested, key), or None (for tests and `sagfast.info`)."""
    backend = _CACHE.get((name, requested, key))
    return None if backend is None else backend.name
