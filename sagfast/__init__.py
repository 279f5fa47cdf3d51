"""sagfast: Self-Attention Guidance for diffusers pipelines, fast enough to leave on.

The names below are imported on first use, so that `sagfast --help` and `import sagfast.cli` do not
load torch and diffusers (several seconds)."""

import importlib

__version__ = "0.1.0"

_NAMES = {
    "SAGConfig": "sagfast.config",
    "StableDiffusionSAGPipeline": "sagfast.pipeline_sag",
    "disable": "sagfast.api",
    "drop_graphs": "sagfast.api",
    "enable": "sagfast.api",
    "guided": "sagfast.api",
    "is_enabled": "sagfast.api",
}

__all__ = [*_NAMES, "__version__"]


def __getattr__(name: str):
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'sagfast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
