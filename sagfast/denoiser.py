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
from sagfast.schedule import Noise, noise_of, prediction_of, x0_eps


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


def slice_batch(value, full: int, rows: slice):
    """`value` with every tensor whose batch dim is `full` cut to its rows `rows`."""
    return _map_batched(value, full, lambda t: t[rows])


def extend_batch(value, full: int, rows: slice):
    """`value` with every tensor whose batch dim is `full` followed by its own rows `rows`."""
    return _map_batched(value, full, lambda t: torch.cat([t, t[rows]]))


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
    guide: slice
    """The guide branch's rows of the batch: uncond under CFG, else cond."""
    noise: Noise
    prediction_type: str
    state_key: tuple

    @property
    def full(self) -> int:
        return self.sample.shape[0]


def predicted_channels(o: torch.Tensor, sample: torch.Tensor) -> int:
    """How many output channels are the prediction SAG reads and guides: a model with learned variance
    (DiT, PixArt, DDPM's "learned_range") outputs 2C, the variance channels pass through untouched."""
    return min(o.shape[1], sample.shape[1])


class GuidedCall:
    """One call of an enabled pipeline: its config, the call's arguments (defaults applied), capture
    and state. Made when the call starts (the scheduler and the capture layer are checked then, once),
    dropped when it ends."""

    def __init__(self, pipe, config: SAGConfig, family, arguments: dict):
        self.pipe = pipe
        self.config = config
        self.family = family
        self.model = pipe.__dict__[family.attribute]
        family.check_scheduler(pipe.scheduler)
        self.arguments = arguments
        self.layer_name, attn, owner, patch = family.resolve_layer(self.model, config.layers)
        self.capture = Capture(attn, owner, patch, config.backend, config.threshold, family.capture_processor)
        self.seed = _seed_of(arguments.get("generator"))
        self.generator = None
        self.previous: dict = {}  # batched mode, eager: state key -> Previous
        self.seen: set = set()  # state keys this call has evaluated (batched mode starts exact)
        self.last_mask = None
        """The [guide rows, h, w] mask of the latest main pass (what the demo draws)."""
        self.graphs = graphs_of(self.model) if config.cuda_graph else None
        self.denoiser = GuidedDenoiser(self)

    def step(self, call: dict) -> torch.Tensor:
        cfg, pipe = self.config, self.pipe
        sample = call.pop(self.family.sample_argument)
        chunks = self.family.cfg_chunks(pipe, self.arguments)
        full = sample.shape[0]
        if full % chunks:
            raise ValueError(f"CFG is on but the model input batch {full} is not [uncond, cond] (odd size)")
        b = full // chunks
        g = self.family.guide_chunk(chunks) * b
        scheduler = pipe.scheduler
        noise = noise_of(scheduler, call[self.family.timestep_argument], b, sample.device)
        image = self.family.to_image(sample, call)
        check_blur_size(image.shape[-2], image.shape[-1], cfg.blur_kernel_size)
        state_key = (tuple(sample.shape), sample.dtype, sample.device, chunks)
        store = self.graphs.state if self.graphs is not None else self.previous
        batched = cfg.mode == "batched" and state_key in self.seen and state_key in store
        self.seen.add(state_key)
        variant = "batched" if batched else "exact"
        step = Step(sample, call, b, slice(g, g + b), noise, prediction_of(scheduler), state_key)
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
            s = dataclasses.replace(step, sample=inp["sample"], call=inp["call"], noise=Noise(*inp["noise"]))
            return self.run_step(variant, s, store)

        return self.graphs.run(self.graph_variant(variant, step), fn, inputs, state)

    def graph_variant(self, variant: str, step: Step) -> tuple:
        """What a graph of this step bakes in besides its inputs: the config, CFG, the prediction type, and
        the map size where the call's inputs give it (Flux: token grids 4x8 and 8x4 pack to one shape)."""
        guide = (step.guide.start, step.guide.stop)  # a slice is unhashable before Python 3.12
        return (variant, self.config, step.state_key[-1], guide, step.prediction_type, self.family.map_size(step.call))

    def graph_inputs(self, step: Step, store: dict):
        """(inputs, state) of the graphed step: what is copied into static buffers before each replay,
        and the persistent batched-mode buffers the step reads and writes in place."""
        # The timestep enters the graph as a device tensor, so one graph serves every step.
        call = dict(step.call, timestep=torch.as_tensor(step.call["timestep"], device=step.sample.device))
        n = step.noise
        inputs = {"sample": step.sample, "call": call, "noise": (n.a, n.b, n.abar, n.scale)}
        previous = store.get(step.state_key)
        return inputs, ((previous.eps, previous.mask) if previous is not None else ())

    def _exact_step(self, step: Step, store: dict) -> torch.Tensor:
        """Main pass, then the degraded pass built from this step's own eps and mask."""
        fam, guide = self.family, step.guide
        o, mask = self._main_pass(step.sample, step.call, guide)
        image, o_image = fam.to_image(step.sample, step.call), fam.to_image(o, step.call)
        c = predicted_channels(o_image, image)
        x0, eps = x0_eps(image[guide, :c], o_image[guide, :c], step.noise, step.prediction_type)
        xd = self._model_input(self._degrade(x0, mask, eps, step.noise), image[guide], step)
        o_deg = self.model(xd, **slice_batch(step.call, step.full, guide), return_dict=False)[0]
        self._remember(step, store, eps, mask)
        return self._combine(o, o_deg, guide, c if o_image is o else None)

    def _batched_step(self, step: Step, previous: Previous, store: dict) -> torch.Tensor:
        """One model call on [main batch, degraded], the degraded input built from the current x and the
        previous evaluation's eps and mask (docs/design.md, "One call per step"):

            x0' = (x - b * eps_prev) / a
            xd  = a * Degrade(x0'; M_prev) + b * eps_prev  =  x - a * M_prev * (x0' - Blur(x0'))

        which is the exact-mode input whenever eps_prev equals this step's eps. Where a = 0 (flow
        matching's first step, sigma = 1) it is x itself: no division by zero is taken.
        """
        fam, guide, full, noise = self.family, step.guide, step.full, step.noise
        image = fam.to_image(step.sample, step.call)
        c = previous.eps.shape[1]
        x = image[guide, :c]
        a = noise.a.view(-1, *([1] * (x.dim() - 1)))
        safe = Noise(torch.where(noise.a > 0, noise.a, torch.ones_like(noise.a)), noise.b, noise.abar, noise.scale)
        x0_prev, _ = x0_eps(x, previous.eps, safe, "epsilon")  # eps is eps whatever the model predicts
        xd = torch.where(a > 0, self._degrade(x0_prev, previous.mask, previous.eps, noise), x.float())
        batch = torch.cat([step.sample, self._model_input(xd, image[guide], step)])
        o_all, mask = self._main_pass(batch, extend_batch(step.call, full, guide), guide)
        o, o_deg = o_all[:full], o_all[full:]
        o_image = fam.to_image(o, step.call)
        _, eps = x0_eps(x, o_image[guide, :c], noise, step.prediction_type)
        self._remember(step, store, eps, mask)
        return self._combine(o, o_deg, guide, c if o_image is o else None)

    def _model_input(self, xd: torch.Tensor, image: torch.Tensor, step: Step) -> torch.Tensor:
        """The degraded latent in the model's layout and dtype, with the guide rows' extra input
        channels (an inpainting UNet's mask and masked image) after it."""
        xd = torch.cat([xd.to(step.sample.dtype), image[:, xd.shape[1] :]], dim=1)
        return self.family.to_model_input(xd, step.call)

    def _degrade(self, x0, mask, eps, noise: Noise) -> torch.Tensor:
        """a * Degrade(x0; mask) + b * eps, through the variance-preserving op (sagfast.schedule)."""
        cfg = self.config
        xd = ops.degrade(x0, mask, eps, noise.abar, cfg.blur_kernel_size, cfg.blur_sigma, backend=cfg.backend)
        return xd if noise.scale is None else xd * noise.scale.view(-1, 1, 1, 1).to(xd.dtype)

    def _combine(self, o, o_deg, guide: slice, c: int | None) -> torch.Tensor:
        """o[k] + s * (o_guide - o_deg) for each CFG chunk k, on the first `c` channels (None: all);
        the rest of o (learned variance) as the main pass gave it."""
        cfg = self.config
        if c is None or c == o.shape[1]:
            return ops.combine(o, o[guide], o_deg, cfg.scale, backend=cfg.backend)
        guided = ops.combine(o[:, :c].contiguous(), o[guide, :c].contiguous(), o_deg[:, :c].contiguous(), cfg.scale, backend=cfg.backend)
        return torch.cat([guided, o[:, c:]], dim=1)

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

    def _main_pass(self, sample, call, guide: slice):
        """The model on `sample` with the capture armed; (output, [guide rows, h, w] bool mask)."""
        cfg = self.config
        capture = self.capture
        capture.arm(guide, record_mass=cfg.mask == "attention", hw=self.family.map_size(call))  # the ablation's masks read no map
        try:
            o = self.model(sample, **call, return_dict=False)[0]
        finally:
            capture.disarm()
        if cfg.mask == "attention":
            self.last_mask = capture.mask(self.layer_name)
            return o, self.last_mask
        hw = capture.map_size(self.layer_name)
        guide_batch = guide.stop - guide.start
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
