"""Turning SAG on and off on a diffusers pipeline."""

from __future__ import annotations

import contextlib
import dataclasses

from sagfast.config import SAGConfig
from sagfast.denoiser import GuidedUNet, resolve_capture_layer
from sagfast.schedule import check_scheduler


def _make_config(config: SAGConfig | None, overrides: dict) -> SAGConfig:
    if config is not None and not isinstance(config, SAGConfig):
        raise TypeError(f"config must be a sagfast.SAGConfig or None; got {type(config).__name__}")
    fields = {f.name for f in dataclasses.fields(SAGConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown SAGConfig field(s) {unknown}; accepted: {sorted(fields)}")
    return dataclasses.replace(config or SAGConfig(), **overrides)


def _base_unet(pipe):
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"{type(pipe).__name__} has no `unet`; sagfast guides UNet-based diffusers pipelines")
    return unet.unet if isinstance(unet, GuidedUNet) else unet


def _set_unet(pipe, unet) -> None:
    # Bypass DiffusionPipeline.__setattr__, which would rewrite pipe.config's record of the UNet class.
    pipe.__dict__["unet"] = unet
    if getattr(pipe, "_all_hooks", None):
        # Model CPU offload: diffusers puts its hooks on the pipeline's components (and puts them back at
        # the end of every call, `maybe_free_model_hooks`). Do the same now, so that the hooks sit on the
        # UNet the pipeline calls: the guided one while SAG is on, the original after `disable`.
        pipe.enable_model_cpu_offload(device=pipe._offload_device)


def enable(pipe, config: SAGConfig | None = None, **overrides):
    """Wrap `pipe.unet` in a guided denoiser that applies SAG at every step. Returns `pipe`.

    `overrides` are SAGConfig fields (`sagfast.enable(pipe, scale=0.5)`). Enabling an enabled pipeline
    replaces its config. Everything is checked before the pipeline is touched.
    """
    config = _make_config(config, overrides)
    _set_unet(pipe, GuidedUNet(_checked_unet(pipe, config), pipe, config))
    return pipe


def _checked_unet(pipe, config: SAGConfig):
    """The pipeline's plain UNet, once the pipeline is checked for SAG with `config`."""
    unet = _base_unet(pipe)
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise ValueError(f"{type(pipe).__name__} has no scheduler")
    check_scheduler(scheduler)
    if not hasattr(type(pipe), "do_classifier_free_guidance"):
        raise ValueError(
            f"{type(pipe).__name__} does not expose `do_classifier_free_guidance`, so sagfast cannot tell "
            "an [uncond, cond] batch from a batch of conditional samples"
        )
    resolve_capture_layer(getattr(unet, "_orig_mod", unet), config.layers)
    return unet


def disable(pipe):
    """Put back the original UNet object (its processors were never changed outside a call)."""
    unet = getattr(pipe, "unet", None)
    if isinstance(unet, GuidedUNet):
        _set_unet(pipe, unet.unet)
    return pipe


def drop_graphs(pipe) -> None:
    """Forget the CUDA graphs of `pipe`'s guided UNet (the enabled one, and the one the drop-in
    pipeline keeps between calls), freeing their memory; the next step captures afresh. Needed after a
    change to the UNet that the graphs cannot see (adapter weights set with `set_adapters`, an
    attribute a layer reads); moved or cast weights, a LoRA loaded and swapped processors are seen."""
    for unet in (getattr(pipe, "unet", None), pipe.__dict__.get("_sagfast_denoiser")):
        if isinstance(unet, GuidedUNet):
            unet._graphs.clear()


def is_enabled(pipe) -> bool:
    return isinstance(getattr(pipe, "unet", None), GuidedUNet)


@contextlib.contextmanager
def guided(pipe, config: SAGConfig | None = None, **overrides):
    """`with sagfast.guided(pipe, scale=0.5): pipe(...)` — SAG inside the block; on exit the pipeline
    is exactly as it was before (enabled with its old config, or not enabled)."""
    before = pipe.unet
    enable(pipe, config, **overrides)
    try:
        yield pipe
    finally:
        _set_unet(pipe, before)
