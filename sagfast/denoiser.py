"""The guided denoiser: a module that stands in for `pipe.unet` and applies SAG inside each call.

The pipeline's loop, scheduler and CFG line stay untouched. Per call (one denoising step) in exact mode:

1. main pass on the pipeline's batch, with `SAGCaptureProcessor` on the capture layer (only for the
   duration of that call) recording the guide rows' attention mass; a pre-hook on the layer's block
   records the true (h, w) of the map;
2. x0 and eps of the guide branch (the first B rows: `uncond` with CFG, `cond` without);
3. degraded input (mask, blur, re-noise) and the degraded pass with the guide branch's slice of every
   batched conditioning input;
4. returns `o[k] + s * (o_guide - o_deg)` for each CFG chunk k, so that the pipeline's own CFG line
   gives `cfg(o_u, o_c) + s * (o_guide - o_deg)`.

The wrapped UNet's processors and forward are never changed outside a call.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from sagfast import ops
from sagfast.capture import SAGCaptureProcessor
from sagfast.config import SAGConfig
from sagfast.ops.degrade import check_blur_size
from sagfast.schedule import alpha_bar, check_scheduler, x0_eps

MID_LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1"


def resolve_capture_layer(unet: torch.nn.Module, layers: str):
    """(name, attention module, module whose input carries the map's (h, w)) for `layers`."""
    name = MID_LAYER if layers == "mid" else layers
    modules = dict(unet.named_modules())
    attn = modules.get(name)
    if not isinstance(attn, Attention) or attn.is_cross_attention:
        found = [n for n, m in modules.items() if isinstance(m, Attention) and not m.is_cross_attention]
        where = "the first self-attention of the mid block" if layers == "mid" else repr(name)
        raise ValueError(
            f"SAG needs a self-attention layer at {where} ({name}), and this {type(unet).__name__} has none "
            f"there. Self-attention layers it has: {found[:8] or 'none'}"
            + (" ..." if len(found) > 8 else "")
        )
    # The map's (h, w) comes from the nearest enclosing module that receives a 4-D [B, C, h, w] input
    # (the Transformer2DModel); an Attention applied to a 4-D input reports it itself.
    parts = name.split(".")
    owners = [modules[".".join(parts[:i])] for i in range(len(parts) - 1, 0, -1)]
    owner = next((m for m in owners if type(m).__name__ == "Transformer2DModel"), attn)
    return name, attn, owner


def _slice_batch(value, full: int, keep: int):
    """`value` with every tensor whose batch dim is `full` cut to its first `keep` rows."""
    if torch.is_tensor(value):
        return value[:keep] if value.dim() >= 1 and value.shape[0] == full else value
    if isinstance(value, dict):
        return {k: _slice_batch(v, full, keep) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_slice_batch(v, full, keep) for v in value)
    return value


class GuidedUNet(torch.nn.Module):
    """Stands in for a diffusers UNet; attributes it does not define (config, dtype, ...) are the UNet's."""

    def __init__(self, unet: torch.nn.Module, pipe, config: SAGConfig):
        super().__init__()
        self.unet = unet
        self.sag_config = config
        self._pipe = weakref.ref(pipe)
        self.capture_name, self._attn, self._map_owner = resolve_capture_layer(unet, config.layers)
        self._signature = inspect.signature(unet.forward)
        self._generator = None

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    @property
    def pipe(self):
        pipe = self._pipe()
        if pipe is None:
            raise RuntimeError("the pipeline this guided UNet belongs to no longer exists")
        return pipe

    def forward(self, *args, **kwargs):
        bound = self._signature.bind(*args, **kwargs)
        call = dict(bound.arguments)
        extra = call.pop("kwargs", {}) if "kwargs" in self._signature.parameters else {}
        call.update(extra)
        return_dict = call.pop("return_dict", True)
        cfg = self.sag_config
        if cfg.scale == 0:
            out = self.unet(**call, return_dict=False)[0]
        else:
            out = self._guided(call, cfg)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def _guided(self, call: dict, cfg: SAGConfig) -> torch.Tensor:
        pipe = self.pipe
        scheduler = pipe.scheduler
        check_scheduler(scheduler)
        sample = call.pop("sample")
        chunks = 2 if pipe.do_classifier_free_guidance else 1
        full = sample.shape[0]
        if full % chunks:
            raise ValueError(f"CFG is on but the model input batch {full} is not [uncond, cond] (odd size)")
        b = full // chunks
        abar = alpha_bar(scheduler, call["timestep"], b, sample.device)
        check_blur_size(sample.shape[-2], sample.shape[-1], cfg.blur_kernel_size)

        o, hw, mass = self._main_pass(sample, call, b, capture=cfg.mask == "attention")
        # Inpainting UNets take [latents, mask, masked-image latents] and predict the latents'
        # channels only: the latent is the first out-channels of the input; the rest rides along.
        latent_channels = o.shape[1]
        x = sample[:b, :latent_channels]
        x0, eps = x0_eps(x, o[:b], abar, scheduler.config.prediction_type)
        mask = self._mask(mass, hw, b, cfg, sample.device)
        xd = ops.degrade(x0, mask, eps, abar, cfg.blur_kernel_size, cfg.blur_sigma, backend=cfg.backend)
        xd = torch.cat([xd.to(sample.dtype), sample[:b, latent_channels:]], dim=1)
        o_deg = self.unet(xd, **_slice_batch(call, full, b), return_dict=False)[0]
        return ops.combine(o, o[:b], o_deg, cfg.scale, backend=cfg.backend)

    def _main_pass(self, sample, call, guide_batch: int, capture: bool):
        hw = {}

        def record_hw(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.dim() == 4:
                hw["hw"] = tuple(hidden.shape[-2:])

        attn = self._attn
        original = attn.processor
        processor = SAGCaptureProcessor(guide_batch, self.sag_config.backend) if capture else None
        handle = self._map_owner.register_forward_pre_hook(record_hw, with_kwargs=True)
        try:
            if processor is not None:
                attn.set_processor(processor)
            o = self.unet(sample, **call, return_dict=False)[0]
        finally:
            handle.remove()
            if processor is not None:
                attn.set_processor(original)
        if "hw" not in hw:
            raise RuntimeError(f"the capture layer {self.capture_name} did not run in the UNet's forward")
        return o, hw["hw"], (processor.mass if processor is not None else None)

    def _mask(self, mass, hw, b: int, cfg: SAGConfig, device) -> torch.Tensor:
        if cfg.mask == "attention":
            return ops.sag_mask_ref(mass, cfg.threshold, hw)
        if cfg.mask == "global":
            return torch.ones(b, *hw, dtype=torch.bool, device=device)
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device).manual_seed(0)
        return torch.rand(b, *hw, generator=self._generator, device=device) < cfg.random_mask_ratio
