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

import dataclasses
import inspect
import weakref

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from sagfast import ops
from sagfast.capture import SAGCaptureProcessor
from sagfast.config import SAGConfig
from sagfast.cuda_graph import ModelWatch, StepGraphs
from sagfast.ops.degrade import check_blur_size
from sagfast.ops.mask import to_map
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


def _map_batched(value, full: int, fn):
    """`value` (tensors in nested dicts, lists, tuples) with `fn` applied to every tensor whose batch
    dim is `full`; everything else (scalars, unbatched tensors) as it is."""
    if torch.is_tensor(value):
        return fn(value) if value.dim() >= 1 and value.shape[0] == full else value
    if isinstance(value, dict):
        return {k: _map_batched(v, full, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_batched(v, full, fn) for v in value)
    return value


def slice_batch(value, full: int, keep: int):
    """`value` with every tensor whose batch dim is `full` cut to its first `keep` rows."""
    return _map_batched(value, full, lambda t: t[:keep])


def extend_batch(value, full: int, keep: int):
    """`value` with every tensor whose batch dim is `full` followed by its own first `keep` rows."""
    return _map_batched(value, full, lambda t: torch.cat([t, t[:keep]]))


class _Identity:
    """Compares equal only to a wrapper of the very same object (and keeps that object alive)."""

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Identity) and self.obj is other.obj and self.obj is not None


@dataclasses.dataclass
class _Previous:
    eps: torch.Tensor  # fp32 [B, C, H, W]
    mask: torch.Tensor  # bool [B, h, w]


@dataclasses.dataclass
class _Step:
    sample: torch.Tensor
    call: dict
    b: int
    abar: torch.Tensor
    prediction_type: str
    shape_key: tuple

    @property
    def full(self) -> int:
        return self.sample.shape[0]

    def latent(self, o: torch.Tensor) -> torch.Tensor:
        # Inpainting UNets take [latents, mask, masked-image latents] and predict the latents'
        # channels only: the latent is the first out-channels of the input; the rest rides along.
        return self.sample[: self.b, : o.shape[1]]

    def model_input(self, xd: torch.Tensor) -> torch.Tensor:
        """The degraded latent, in the model's dtype, with the guide rows' extra input channels."""
        return torch.cat([xd.to(self.sample.dtype), self.sample[: self.b, xd.shape[1] :]], dim=1)


class GuidedUNet(torch.nn.Module):
    """Stands in for a diffusers UNet; attributes it does not define (config, dtype, ...) are the UNet's."""

    def __init__(self, unet: torch.nn.Module, pipe, config: SAGConfig):
        super().__init__()
        self.unet = unet
        self.sag_config = config
        self._pipe = weakref.ref(pipe)
        # A torch.compile'd UNet (OptimizedModule) is called as it is; its layers are found on the original.
        original = getattr(unet, "_orig_mod", unet)
        self.capture_name, self._attn, self._map_owner = resolve_capture_layer(original, config.layers)
        self._signature = inspect.signature(original.forward)
        self._generator = None
        # Batched mode: eps and mask of the previous evaluation, per input shape, and the pipeline
        # call they belong to. Every diffusers pipeline calls `scheduler.set_timesteps` once per call,
        # which makes a new `timesteps` tensor: holding that object (not its id) tells a new call from
        # the next step of the same one; a change of batch, shape, dtype, device or CFG starts afresh.
        self._state: dict = {}
        self._state_call = None
        self._graphs = StepGraphs()
        self._watch = None  # ModelWatch of the UNet, made at the first graphed step

    # accelerate's hook attributes describe the module they sit on: read through to the UNet, they would
    # make accelerate wrap (or restore) the UNet's own forward in place of this one's.
    _OWN_ATTRIBUTES = frozenset({"_hf_hook", "_old_forward"})

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in self._OWN_ATTRIBUTES:
                raise
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
        try:
            chunks = 2 if pipe.do_classifier_free_guidance else 1
        except AttributeError as e:
            raise RuntimeError(
                f"the guided UNet was called outside a {type(pipe).__name__} call ({e}): it reads whether CFG "
                "is on from the pipeline, which sets its guidance scale when it is called"
            ) from e
        full = sample.shape[0]
        if full % chunks:
            raise ValueError(f"CFG is on but the model input batch {full} is not [uncond, cond] (odd size)")
        b = full // chunks
        abar = alpha_bar(scheduler, call["timestep"], b, sample.device)
        check_blur_size(sample.shape[-2], sample.shape[-1], cfg.blur_kernel_size)
        shape_key = (tuple(sample.shape), sample.dtype, sample.device, chunks)
        call_key = (_Identity(getattr(scheduler, "timesteps", None)), shape_key)
        batched = cfg.mode == "batched" and self._state_call == call_key and shape_key in self._state
        variant = "batched" if batched else "exact"
        step = _Step(sample, call, b, abar, scheduler.config.prediction_type, shape_key)
        out = None
        if cfg.cuda_graph:
            out = self._graphed(variant, step, cfg)
        if out is None:
            out = self._run_step(variant, step, cfg)
        self._state_call = call_key if cfg.mode == "batched" else None
        return out

    def _run_step(self, variant: str, step: "_Step", cfg: SAGConfig) -> torch.Tensor:
        if variant == "batched":
            return self._batched_step(step, self._state[step.shape_key], cfg)
        return self._exact_step(step, cfg)

    def _graphed(self, variant: str, step: "_Step", cfg: SAGConfig):
        why = []
        if step.sample.device.type != "cuda":
            why.append(f"CUDA graphs need CUDA tensors, got {step.sample.device.type}")
        if cfg.mask == "random":
            why.append('mask="random" draws from a generator the graph does not own')
        if why:
            self._graphs.clear()  # e.g. the pipeline moved to the CPU: free the GPU memory of its graphs
            for reason in why:
                self._graphs.refuse(reason)
            return None
        inputs, state = self._graph_inputs(step)

        def fn(inp):
            s = dataclasses.replace(step, sample=inp["sample"], call=inp["call"], abar=inp["abar"])
            return self._run_step(variant, s, cfg)

        if self._watch is None:
            self._watch = ModelWatch(self)  # this module too: offload hooks may sit on it
        return self._graphs.run(variant, fn, inputs, state, self._watch)

    def _graph_inputs(self, step: "_Step"):
        """(inputs, state) of the graphed step: what is copied into static buffers before each replay,
        and the persistent batched-mode buffers the step reads and writes in place."""
        # The timestep enters the graph as a device tensor, so one graph serves every step.
        call = dict(step.call, timestep=torch.as_tensor(step.call["timestep"], device=step.sample.device))
        inputs = {"sample": step.sample, "call": call, "abar": step.abar}
        previous = self._state.get(step.shape_key)
        return inputs, ((previous.eps, previous.mask) if previous is not None else ())

    def _exact_step(self, step: "_Step", cfg: SAGConfig) -> torch.Tensor:
        """Main pass, then the degraded pass built from this step's own eps and mask."""
        b = step.b
        o, hw, captured = self._main_pass(step.sample, step.call, b)
        x0, eps = x0_eps(step.latent(o), o[:b], step.abar, step.prediction_type)
        mask = self._mask(captured, hw, b, cfg, step.sample.device)
        xd = step.model_input(ops.degrade(x0, mask, eps, step.abar, cfg.blur_kernel_size, cfg.blur_sigma, backend=cfg.backend))
        o_deg = self.unet(xd, **slice_batch(step.call, step.full, b), return_dict=False)[0]
        self._remember(step, cfg, eps, mask)
        return ops.combine(o, o[:b], o_deg, cfg.scale, backend=cfg.backend)

    def _batched_step(self, step: "_Step", previous: "_Previous", cfg: SAGConfig) -> torch.Tensor:
        """One model call on [main batch, degraded], the degraded input built from the current x and the
        previous evaluation's eps and mask (DESIGN.md section 4):

            x0' = (x - sqrt(1 - abar) * eps_prev) / sqrt(abar)
            xd  = sqrt(abar) * Degrade(x0'; M_prev) + sqrt(1 - abar) * eps_prev
                = x - sqrt(abar) * M_prev * (x0' - Blur(x0'))

        which is the exact-mode input whenever eps_prev equals this step's eps.
        """
        b, full = step.b, step.full
        x = step.sample[:b, : previous.eps.shape[1]]
        x0_prev, _ = x0_eps(x, previous.eps, step.abar, "epsilon")  # eps is eps whatever the model predicts
        xd = step.model_input(
            ops.degrade(x0_prev, previous.mask, previous.eps, step.abar, cfg.blur_kernel_size, cfg.blur_sigma, backend=cfg.backend)
        )
        batch = torch.cat([step.sample, xd])
        o_all, hw, captured = self._main_pass(batch, extend_batch(step.call, full, b), b)
        o, o_deg = o_all[:full], o_all[full:]
        _, eps = x0_eps(x, o[:b], step.abar, step.prediction_type)
        self._remember(step, cfg, eps, self._mask(captured, hw, b, cfg, step.sample.device))
        return ops.combine(o, o[:b], o_deg, cfg.scale, backend=cfg.backend)

    def _remember(self, step: "_Step", cfg: SAGConfig, eps, mask) -> None:
        """Batched mode: keep this evaluation's eps and mask for the next one, in buffers that persist
        per shape (a CUDA graph reads and writes them at fixed addresses)."""
        if cfg.mode != "batched":
            return
        state = self._state.get(step.shape_key)
        if state is None or state.eps.shape != eps.shape or state.mask.shape != mask.shape:
            self._state[step.shape_key] = _Previous(eps.clone(), mask.clone())
        else:
            state.eps.copy_(eps)
            state.mask.copy_(mask)

    def _main_pass(self, sample, call, guide_batch: int):
        hw = {}

        def record_hw(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.dim() == 4:
                hw["hw"] = tuple(hidden.shape[-2:])

        attn = self._attn
        original = attn.processor
        uses_xformers = "XFormers" in type(original).__name__
        cfg = self.sag_config
        capture = cfg.mask == "attention"  # the ablation's global and random masks read no map
        processor = SAGCaptureProcessor(guide_batch, cfg.backend, uses_xformers, cfg.threshold) if capture else None
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
        return o, hw["hw"], (processor.mask if processor is not None else None)

    def _mask(self, attention_mask, hw, b: int, cfg: SAGConfig, device) -> torch.Tensor:
        """[B, h, w] bool: the captured `mass > threshold` laid out on the map, or the ablation's mask."""
        if cfg.mask == "attention":
            return to_map(attention_mask, hw)
        if cfg.mask == "global":
            return torch.ones(b, *hw, dtype=torch.bool, device=device)
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device).manual_seed(0)
        return torch.rand(b, *hw, generator=self._generator, device=device) < cfg.random_mask_ratio
