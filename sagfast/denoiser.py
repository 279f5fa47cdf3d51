"""The guided denoiser: what `pipe.unet` is while one call of an enabled pipeline runs.

`sagfast.enable` gives the pipeline a subclass of its own class (sagfast.api) whose `__call__` makes
a `GuidedCall` for that call, and whose `unet` property returns the call's `GuidedDenoiser` while
the call runs (in that thread) and the user's own model at any other time. The pipeline's loop,
scheduler and CFG line stay untouched. Per model call (one denoising step) in exact mode:

1. main pass on the pipeline's batch, with the call's `Capture` armed: the capture layer's switch
   records the guide rows' attention mass and the map hook the true (h, w) of the map;
2. x0 and eps of the guide branch (the first B rows: `uncond` with CFG, `cond` without);
3. degraded input (mask, blur, re-noise) and the degraded pass with the guide branch's slice of every
   batched conditioning input;
4. returns `o[k] + s * (o_guide - o_deg)` for each CFG chunk k, so that the pipeline's own CFG line
   gives `cfg(o_u, o_c) + s * (o_guide - o_deg)`.

Everything a call keeps (batched mode's previous eps and mask, the random mask's generator) lives in
its `GuidedCall` and goes with it; only CUDA graphs outlive a call (sagfast.cuda_graph keeps them
per model).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from sagfast import ops
from sagfast.capture import Capture
from sagfast.config import SAGConfig
from sagfast.cuda_graph import graphs_of
from sagfast.ops.degrade import check_blur_size
from sagfast.schedule import alpha_bar, x0_eps


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


@dataclasses.dataclass
class Previous:
    """Batched mode: eps and mask of the previous evaluation."""

    eps: torch.Tensor  # fp32 [B, C, H, W]
    mask: torch.Tensor  # bool [B, h, w]


@dataclasses.dataclass
class Step:
    sample: torch.Tensor
    call: dict
    b: int
    abar: torch.Tensor
    prediction_type: str
    state_key: tuple

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


class GuidedCall:
    """One call of an enabled pipeline: its config, capture and state. Made when the call starts (the
    scheduler and the capture layer are checked then, once), dropped when it ends."""

    def __init__(self, pipe, config: SAGConfig, family, generator=None):
        self.pipe = pipe
        self.config = config
        self.family = family
        self.model = pipe.__dict__[family.attribute]
        family.check_scheduler(pipe.scheduler)
        self.layer_name, attn, owner = family.resolve_layer(self.model, config.layers)
        self.capture = Capture(attn, owner, config.backend, config.threshold)
        self.seed = _seed_of(generator)
        self.generator = None
        self.previous: dict = {}  # batched mode, eager: state key -> Previous
        self.seen: set = set()  # state keys this call has evaluated (batched mode starts exact)
        self.graphs = graphs_of(self.model) if config.cuda_graph else None
        self.denoiser = GuidedDenoiser(self)

    def step(self, call: dict) -> torch.Tensor:
        cfg, pipe = self.config, self.pipe
        sample = call.pop(self.family.sample_argument)
        chunks = self.family.cfg_chunks(pipe)
        full = sample.shape[0]
        if full % chunks:
            raise ValueError(f"CFG is on but the model input batch {full} is not [uncond, cond] (odd size)")
        b = full // chunks
        scheduler = pipe.scheduler
        abar = alpha_bar(scheduler, call["timestep"], b, sample.device)
        check_blur_size(sample.shape[-2], sample.shape[-1], cfg.blur_kernel_size)
        state_key = (tuple(sample.shape), sample.dtype, sample.device, chunks)
        store = self.graphs.state if self.graphs is not None else self.previous
        batched = cfg.mode == "batched" and state_key in self.seen and state_key in store
        self.seen.add(state_key)
        variant = "batched" if batched else "exact"
        step = Step(sample, call, b, abar, scheduler.config.prediction_type, state_key)
        out = None
        if self.graphs is not None:
            out = self._graphed(variant, step, store)
        if out is None:
            out = self.run_step(variant, step, store)
        return out

    def run_step(self, variant: str, step: Step, store: dict) -> torch.Tensor:
        if variant == "batched":
            return self._batched_step(step, store[step.state_key], store)
        return self._exact_step(step, store)

    def _graphed(self, variant: str, step: Step, store: dict):
        why = []
        if step.sample.device.type != "cuda":
            why.append(f"CUDA graphs need CUDA tensors, got {step.sample.device.type}")
        if self.config.mask == "random":
            why.append('mask="random" draws from a generator the graph does not own')
        if why:
            self.graphs.clear()  # e.g. the pipeline moved to the CPU: free the GPU memory of its graphs
            for reason in why:
                self.graphs.refuse(reason)
            return None
        inputs, state = self.graph_inputs(step, store)

        def fn(inp):
            s = dataclasses.replace(step, sample=inp["sample"], call=inp["call"], abar=inp["abar"])
            return self.run_step(variant, s, store)

        return self.graphs.run(self.graph_variant(variant, step), fn, inputs, state)

    def graph_variant(self, variant: str, step: Step) -> tuple:
        """What a graph of this step bakes in besides its inputs: the config, CFG, the prediction type."""
        return (variant, self.config, step.state_key[-1], step.prediction_type)

    def graph_inputs(self, step: Step, store: dict):
        """(inputs, state) of the graphed step: what is copied into static buffers before each replay,
        and the persistent batched-mode buffers the step reads and writes in place."""
        # The timestep enters the graph as a device tensor, so one graph serves every step.
        call = dict(step.call, timestep=torch.as_tensor(step.call["timestep"], device=step.sample.device))
        inputs = {"sample": step.sample, "call": call, "abar": step.abar}
        previous = store.get(step.state_key)
        return inputs, ((previous.eps, previous.mask) if previous is not None else ())

    def _exact_step(self, step: Step, store: dict) -> torch.Tensor:
        """Main pass, then the degraded pass built from this step's own eps and mask."""
        cfg, b = self.config, step.b
        o, mask = self._main_pass(step.sample, step.call, b)
        x0, eps = x0_eps(step.latent(o), o[:b], step.abar, step.prediction_type)
        xd = step.model_input(ops.degrade(x0, mask, eps, step.abar, cfg.blur_kernel_size, cfg.blur_sigma, backend=cfg.backend))
        o_deg = self.model(xd, **slice_batch(step.call, step.full, b), return_dict=False)[0]
        self._remember(step, store, eps, mask)
        return ops.combine(o, o[:b], o_deg, cfg.scale, backend=cfg.backend)

    def _batched_step(self, step: Step, previous: Previous, store: dict) -> torch.Tensor:
        """One model call on [main batch, degraded], the degraded input built from the current x and the
        previous evaluation's eps and mask (docs/design.md, "One call per step"):

            x0' = (x - sqrt(1 - abar) * eps_prev) / sqrt(abar)
            xd  = sqrt(abar) * Degrade(x0'; M_prev) + sqrt(1 - abar) * eps_prev
                = x - sqrt(abar) * M_prev * (x0' - Blur(x0'))

        which is the exact-mode input whenever eps_prev equals this step's eps.
        """
        cfg, b, full = self.config, step.b, step.full
        x = step.sample[:b, : previous.eps.shape[1]]
        x0_prev, _ = x0_eps(x, previous.eps, step.abar, "epsilon")  # eps is eps whatever the model predicts
        xd = step.model_input(
            ops.degrade(x0_prev, previous.mask, previous.eps, step.abar, cfg.blur_kernel_size, cfg.blur_sigma, backend=cfg.backend)
        )
        o_all, mask = self._main_pass(torch.cat([step.sample, xd]), extend_batch(step.call, full, b), b)
        o, o_deg = o_all[:full], o_all[full:]
        _, eps = x0_eps(x, o[:b], step.abar, step.prediction_type)
        self._remember(step, store, eps, mask)
        return ops.combine(o, o[:b], o_deg, cfg.scale, backend=cfg.backend)

    def _remember(self, step: Step, store: dict, eps, mask) -> None:
        """Batched mode: keep this evaluation's eps and mask for the next one, in buffers that persist
        per shape (a CUDA graph reads and writes them at fixed addresses)."""
        if self.config.mode != "batched":
            return
        state = store.get(step.state_key)
        if state is None or state.eps.shape != eps.shape or state.mask.shape != mask.shape:
            # Normal tensors even under torch.inference_mode: a later call outside it writes into them.
            with torch.inference_mode(False):
                store[step.state_key] = Previous(torch.empty_like(eps), torch.empty_like(mask))
            state = store[step.state_key]
        state.eps.copy_(eps)
        state.mask.copy_(mask)

    def _main_pass(self, sample, call, guide_batch: int):
        """The model on `sample` with the capture armed; (output, [guide_batch, h, w] bool mask)."""
        cfg = self.config
        capture = self.capture
        capture.arm(guide_batch, record_mass=cfg.mask == "attention")  # the ablation's masks read no map
        try:
            o = self.model(sample, **call, return_dict=False)[0]
        finally:
            capture.disarm()
        if cfg.mask == "attention":
            return o, capture.mask(self.layer_name)
        hw = capture.map_size(self.layer_name)
        if cfg.mask == "global":
            return o, torch.ones(guide_batch, *hw, dtype=torch.bool, device=sample.device)
        if self.generator is None or self.generator.device != sample.device:
            self.generator = torch.Generator(device=sample.device).manual_seed(self.seed)
        return o, torch.rand(guide_batch, *hw, generator=self.generator, device=sample.device) < cfg.random_mask_ratio


def _seed_of(generator) -> int:
    """The random mask's seed: the call's generator's (so one seed gives one image), else a fresh one."""
    if isinstance(generator, (list, tuple)) and generator:
        generator = generator[0]
    if isinstance(generator, torch.Generator):
        return generator.initial_seed()
    return torch.Generator().seed()


class GuidedDenoiser(torch.nn.Module):
    """`pipe.unet` during a guided call: the pipeline calls it like its UNet, and reads the UNet's
    attributes (config, dtype, device, ...) through it. It owns no parameters: the model is held as a
    plain attribute, not a submodule."""

    def __init__(self, call: GuidedCall):
        super().__init__()
        self.__dict__["guided_call"] = call
        self.__dict__["model"] = call.model
        # A torch.compile'd model (OptimizedModule) is called as it is; its signature is the original's.
        self.__dict__["signature"] = inspect.signature(getattr(call.model, "_orig_mod", call.model).forward)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["model"], name)

    def forward(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        call = dict(bound.arguments)
        if "kwargs" in self.signature.parameters:
            call.update(call.pop("kwargs", {}))
        return_dict = call.pop("return_dict", True)
        guided = self.guided_call
        if guided.config.scale == 0:
            out = self.model(**call, return_dict=False)[0]
        else:
            out = guided.step(call)
        return guided.family.wrap_output(out) if return_dict else (out,)
