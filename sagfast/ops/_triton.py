"""Where the Triton backend can run, and the loader of its kernels (sagfast.kernels).

Triton kernels run on CUDA tensors, and on CPU tensors only under the interpreter
(`TRITON_INTERPRET=1`, which must be set before any kernel is defined: tests/conftest.py does it).
Kernels are imported on first use, so importing sagfast never needs Triton.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import pathlib
import sys


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _find() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install -c constraints.txt triton)"
    return None


# Looked up at import (cheaply: find_spec, not import), not on first use: torch.compile traces the
# dispatch, and an import inside a traced function is a graph break. The kernels import triton on use.
_IMPORT_ERROR = _find()


def _import_error() -> str | None:
    return _IMPORT_ERROR


def available() -> list[str]:
    why = _import_error()
    return [why] if why else []


def on_device(tensor):
    """Context for a kernel launch: Triton launches on the current CUDA device (torch.library adds no
    device guard), so a tensor on another GPU needs its device made current."""
    import torch

    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def device_reasons(*tensors) -> list[str]:
    """Reasons Triton cannot take tensors on these devices."""
    out = []
    for t in tensors:
        dev = t.device.type
        if dev == "cuda":
            continue
        if dev == "cpu" and interpreting():
            continue
        extra = " (CPU tensors need TRITON_INTERPRET=1 set before the kernels are defined)" if dev == "cpu" else ""
        out.append(f"Triton runs on CUDA tensors, got a {dev} tensor{extra}")
        break
    return out


def auto_skip(*inputs) -> list[str]:
    """Why "auto" does not pick Triton for these inputs: CPU tensors run only under the interpreter,
    which is a test mode (~ms per program instance); auto leaves them to the C++ op or the reference."""
    if any(getattr(t, "device", None) is not None and t.device.type == "cpu" for t in inputs if hasattr(t, "device")):
        return ["the Triton interpreter (CPU tensors) is taken only when backend='triton' is requested"]
    return []


def kernels(name: str):
    """The module sagfast.kernels.<name>.

    Installed, `kernels/` is the package sagfast.kernels (setup.py's package_dir). In a source
    checkout used without installing (python -m pytest from the repository root) that mapping does
    not exist, so the folder beside the sagfast package is registered under that name.
    """
    try:
        return importlib.import_module(f"sagfast.kernels.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("sagfast.kernels", f"sagfast.kernels.{name}"):
            raise
    import sagfast

    folder = pathlib.Path(sagfast.__file__).resolve().parent.parent / "kernels"
    if "sagfast.kernels" not in sys.modules:
        spec = importlib.util.spec_from_file_location("sagfast.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)])
        if spec is None:
            raise ModuleNotFoundError(f"sagfast.kernels is not installed and {folder} has no kernels")
        module = importlib.util.module_from_spec(spec)
        sys.modules["sagfast.kernels"] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"sagfast.kernels.{name}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
