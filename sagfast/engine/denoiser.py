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
its `GuidedCall` and goes with it; only CUDA graphs outlive a call (sagfast.engine.cuda_graph keeps them
per model).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from sagfast import ops
from sagfast.attention.capture import Capture
from sagfast.config import SAGConfig
from sagfast.engine.batch import gather_batch, slice_batch
from sagfast.engine.cuda_graph import graphs_of
from sagfast.engine.schedule import Noise, evaluation_index, noise_of, prediction_of, x0_eps
from sagfast.ops.degrade import check_blur_size


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
    cond: slice
    """The conditional branch's rows (what PAG perturbs)."""
    noise: Noise
    prediction_type: str
    state_key: tuple
    sag: bool
    """Whether this step runs SAG's degraded rows."""
    pag_scale: float | torch.Tensor
    """PAG's scale at this step; 0 when this step runs no perturbed rows. A 0-d tensor in a CUDA graph
    of adaptive PAG (one graph serves every step's scale)."""
    track: bool = False
    """Batched mode, a step without SAG before a step with it: the main pass still records eps and
    mask, so that the next SAG step can be batched."""

    @property
    def pag(self) -> bool:
        return torch.is_tensor(self.pag_scale) or self.pag_scale > 0

    @property
    def full(self) -> int:
        return self.sample.shape[0]


def predicted_channels(o: torch.Tensor, sample: torch.Tensor) -> int:
    """How many output channels are the prediction SAG reads and guides: a model with learned variance
    (DiT, PixArt, DDPM's "learned_range") outputs 2C, the variance channels pass through untouched."""
    return min(o.shape[1], sample.shape[1])


class GuidedCall:
    """One call of an enabled pipeline: its config, the call's arguments (defaults applied), capture
    and state. Made when the call starts (the scheduler, the capture layer and the PAG layers are
    checked then, once), dropped when it ends."""

    def __init__(self, pipe, config: SAGConfig, family, arguments: dict):
        self.pipe = pipe
        self.config = config
        self.family = family
        self.model = pipe.__dict__[family.attribute]
        family.check_scheduler(pipe.scheduler)
        self.arguments = arguments
        self.layer_name, attn, owner, patch = family.resolve_layer(self.model, config.layers)
        self.capture = Capture(attn, owner, patch, config.backend, config.threshold, family.capture_processor)
        if config.pag_scale > 0:
            self.capture.perturbed = frozenset(family.pag_layers(self.model, config.pag_layers))
            self.capture.perturb_processor = family.perturbed_attention
        self.seeds = _seeds_of(arguments.get("generator"))
        self.generators = None
        self.previous: dict = {}  # batched mode, eager: state key -> Previous
        self.last_sag = None
        """Batched mode: the state key of the previous evaluation when it recorded eps and mask (a SAG
        step, or a tracked one: `Step.track`), which are then this step's eps_prev and mask; else None,
        and the next SAG step is exact."""
        self.first_index = None
        """Where the call's first evaluation is in the scheduler's timesteps (img2img starts mid-way)."""
        self.last_mask = None
        """The [guide rows, h, w] mask of the latest main pass (what the demo draws)."""
        self.graphs = graphs_of(self.model) if config.cuda_graph else None
        self.denoiser = GuidedDenoiser(self)

    def fraction(self, timestep) -> float:
        """i / N for this evaluation: step i of the N steps this call runs, counted as diffusers' guiders
        count them (both evaluations of a Heun-type step are that step)."""
        scheduler = self.pipe.scheduler
        index = evaluation_index(scheduler, timestep)
        if self.first_index is None:
            self.first_index = index
        order = max(1, int(getattr(scheduler, "order", 1)))
        steps = max(1, -(-(len(scheduler.timesteps) - self.first_index) // order))
        return ((index - self.first_index) // order) / steps

    def step(self, call: dict) -> torch.Tensor:
        """The guided prediction for one model call of the pipeline (`call`: the model's arguments)."""
        cfg, fam = self.config, self.family
        sample = call.pop(fam.sample_argument)
        chunks = fam.cfg_chunks(self.pipe, self.arguments)
        full = sample.shape[0]
        if full % chunks:
            raise ValueError(f"CFG is on but the model input batch {full} is not [uncond, cond] (odd size)")
        b = full // chunks
        timestep = call[fam.timestep_argument]
        f = self.fraction(timestep) if cfg.has_intervals else 0.0
        pag_scale = 0.0
        if cfg.pag_scale > 0 and _within(cfg.pag_interval, f):
            pag_scale = cfg.pag_scale_at(_first(timestep)) if cfg.pag_adaptive_scale else cfg.pag_scale
        sag = cfg.scale > 0 and _within(cfg.sag_interval, f)
        start, stop = cfg.sag_interval
        track = cfg.mode == "batched" and cfg.scale > 0 and not sag and start < stop and f < stop
        if chunks == 2 and not _within(cfg.cfg_interval, f):
            # CFG outside its interval: the cond rows alone, returned for both halves, so that the
            # pipeline's CFG line o_u + g * (o_c - o_u) gives the guided cond prediction.
            rows = slice(fam.cond_chunk(2) * b, fam.cond_chunk(2) * b + b)
            out = self.guided_rows(sample[rows], slice_batch(call, full, rows), 1, sag, pag_scale, track)
            return torch.cat([out, out])
        return self.guided_rows(sample, call, chunks, sag, pag_scale, track)

    def guided_rows(self, sample, call: dict, chunks: int, sag: bool, pag_scale: float, track: bool = False) -> torch.Tensor:
        """The guided prediction of a batch of `chunks` CFG chunks with the terms this step runs
        (`track`: see `Step.track`)."""
        cfg, fam = self.config, self.family
        if not sag and not pag_scale > 0 and not track:
            self.last_sag = None
            return self.model(sample, **call, return_dict=False)[0]
        full = sample.shape[0]
        b = full // chunks
        g, c = fam.guide_chunk(chunks) * b, fam.cond_chunk(chunks) * b
        scheduler = self.pipe.scheduler
        noise = noise_of(scheduler, call[fam.timestep_argument], b, sample.device)
        if sag:
            image = fam.to_image(sample, call)
            check_blur_size(image.shape[-2], image.shape[-1], cfg.blur_kernel_size)
        state_key = (tuple(sample.shape), sample.dtype, sample.device, chunks)
        store = self.graphs.state if self.graphs is not None else self.previous
        batched = cfg.mode == "batched" and sag and self.last_sag == state_key and state_key in store
        self.last_sag = state_key if sag or track else None
        variant = "batched" if batched else "exact"
        step = Step(sample, call, b, slice(g, g + b), slice(c, c + b), noise, prediction_of(scheduler), state_key, sag, pag_scale, track)
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
        if self.config.mask == "random" and (step.sag or step.track):
            why.append('mask="random" draws from a generator the graph does not own')
        if why:
            self.graphs.clear()  # e.g. the pipeline moved to the CPU: free the GPU memory of its graphs
            for reason in why:
                self.graphs.refuse(reason)
            return None
        inputs, state = self.graph_inputs(step, store)

        def fn(inp):
            s = dataclasses.replace(step, sample=inp["sample"], call=inp["call"], noise=Noise(*inp["noise"]), pag_scale=inp["pag_scale"])
            return self.run_step(variant, s, store)

        return self.graphs.run(self.graph_variant(variant, step), fn, inputs, state)

    def graph_variant(self, variant: str, step: Step) -> tuple:
        """What a graph of this step bakes in besides its inputs: the config, the terms the step runs,
        CFG, the prediction type, and the map size where the call's inputs give it (Flux: token grids
        4x8 and 8x4 pack to one shape)."""
        guide = (step.guide.start, step.guide.stop)  # a slice is unhashable before Python 3.12
        terms = (step.sag, step.pag, step.track)
        return (variant, terms, self.config, step.state_key[-1], guide, step.prediction_type, self.family.map_size(step.call))

    def graph_inputs(self, step: Step, store: dict):
        """(inputs, state) of the graphed step: what is copied into static buffers before each replay,
        and the persistent batched-mode buffers the step reads and writes in place."""
        device = step.sample.device
        # The timestep enters the graph as a device tensor, so one graph serves every step; so does an
        # adaptive PAG scale (a constant one is part of the config the graph is keyed by).
        call = dict(step.call, timestep=torch.as_tensor(step.call["timestep"], device=device))
        pag_scale = step.pag_scale
        if self.config.pag_adaptive_scale and step.pag:
            pag_scale = torch.as_tensor(pag_scale, dtype=torch.float32, device=device)
        n = step.noise
        inputs = {"sample": step.sample, "call": call, "noise": (n.a, n.b, n.abar, n.scale), "pag_scale": pag_scale}
        previous = store.get(step.state_key)
        return inputs, ((previous.eps, previous.mask) if previous is not None and (step.sag or step.track) else ())

    def _exact_step(self, step: Step, store: dict) -> torch.Tensor:
        """Main pass, then (SAG) the degraded pass built from this step's own eps and mask. PAG's
        perturbed rows go with the main pass, or with the degraded one (`exact_pag_pass`)."""
        fam, guide = self.family, step.guide
        late_pag = step.pag and step.sag and self.config.exact_pag_pass == "degraded"
        out = self._pass(step, main=True, perturbed=step.pag and not late_pag)
        o = out["main"]
        image, o_image = fam.to_image(step.sample, step.call), fam.to_image(o, step.call)
        c = predicted_channels(o_image, image)
        if step.sag or step.track:
            x0, eps = x0_eps(image[guide, :c], o_image[guide, :c], step.noise, step.prediction_type)
            self._remember(step, store, eps, out["mask"])
        if step.sag:
            xd = self._model_input(self._degrade(x0, out["mask"], eps, step.noise), image[guide], step)
            out.update(self._pass(step, degraded=xd, perturbed=late_pag))
        elif not step.pag:
            return o  # tracking only: the prediction is the model's
        return self._combine(o, out.get("degraded"), out.get("perturbed"), step, c if o_image is o else None)

    def _batched_step(self, step: Step, previous: Previous, store: dict) -> torch.Tensor:
        """One model call on [main batch, perturbed (PAG), degraded], the degraded input built from the
        current x and the previous evaluation's eps and mask (docs/design.md, "One call per step"):

            x0' = (x - b * eps_prev) / a
            xd  = a * Degrade(x0'; M_prev) + b * eps_prev  =  x - a * M_prev * (x0' - Blur(x0'))

        which is the exact-mode input whenever eps_prev equals this step's eps. Where a = 0 (flow
        matching's first step, sigma = 1) it is x itself: no division by zero is taken.
        """
        fam, guide, noise = self.family, step.guide, step.noise
        image = fam.to_image(step.sample, step.call)
        c = previous.eps.shape[1]
        x = image[guide, :c]
        a = noise.a.view(-1, *([1] * (x.dim() - 1)))
        safe = Noise(torch.where(noise.a > 0, noise.a, torch.ones_like(noise.a)), noise.b, noise.abar, noise.scale)
        x0_prev, _ = x0_eps(x, previous.eps, safe, "epsilon")  # eps is eps whatever the model predicts
        xd = torch.where(a > 0, self._degrade(x0_prev, previous.mask, previous.eps, noise), x.float())
        out = self._pass(step, main=True, perturbed=step.pag, degraded=self._model_input(xd, image[guide], step))
        o = out["main"]
        o_image = fam.to_image(o, step.call)
        _, eps = x0_eps(x, o_image[guide, :c], noise, step.prediction_type)
        self._remember(step, store, eps, out["mask"])
        return self._combine(o, out["degraded"], out.get("perturbed"), step, c if o_image is o else None)

    def _pass(self, step: Step, main: bool = False, perturbed: bool = False, degraded: torch.Tensor | None = None) -> dict:
        """One model call on the rows [main batch][perturbed: the cond rows, PAG's layers perturbed]
        [degraded: SAG's input, with the guide rows' conditioning]. Returns each part's output by name,
        and with the main batch (SAG on) the [guide rows, h, w] mask as "mask"."""
        parts, inputs, rows = [], [], []
        if main:
            parts.append(("main", step.full))
            inputs.append(step.sample)
            rows.append(slice(None))
        if perturbed:
            parts.append(("perturbed", step.b))
            inputs.append(step.sample[step.cond])
            rows.append(step.cond)
        if degraded is not None:
            parts.append(("degraded", step.b))
            inputs.append(degraded)
            rows.append(step.guide)
        sample = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
        call = gather_batch(step.call, step.full, rows)
        capture, cfg = self.capture, self.config
        capture.reinstall()
        if main and (step.sag or step.track):
            capture.arm(
                step.guide, record_mass=cfg.mask == "attention", hw=self.family.map_size(step.call)
            )  # the ablation's masks read no map
        if perturbed:
            start = step.full if main else 0
            capture.perturb_rows = slice(start, start + step.b)
        try:
            o = self.model(sample, **call, return_dict=False)[0]
        finally:
            capture.disarm()
            capture.perturb_rows = None
        out, at = {}, 0
        for name, n in parts:
            out[name] = o[at : at + n] if len(parts) > 1 else o
            at += n
        if main and (step.sag or step.track):
            out["mask"] = self._mask(step)
        return out

    def _mask(self, step: Step) -> torch.Tensor:
        """[guide rows, h, w] bool: the rows' SAG mask after a main pass (attention, global or random)."""
        cfg, capture, device = self.config, self.capture, step.sample.device
        if cfg.mask == "attention":
            self.last_mask = capture.mask(self.layer_name)
            return self.last_mask
        hw = capture.map_size(self.layer_name)
        if cfg.mask == "global":
            return torch.ones(step.b, *hw, dtype=torch.bool, device=device)
        if self.generators is None or self.generators[0].device != device:
            self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in self.seeds]
        if len(self.generators) == step.b:  # each image's mask from its own generator
            noise = torch.cat([torch.rand(1, *hw, generator=g, device=device) for g in self.generators])
        else:
            noise = torch.rand(step.b, *hw, generator=self.generators[0], device=device)
        return noise < cfg.random_mask_ratio

    def _model_input(self, xd: torch.Tensor, image: torch.Tensor, step: Step) -> torch.Tensor:
        """The degraded latent in the model's layout and dtype, with the guide rows' extra input
        channels (an inpainting UNet's mask and masked image) after it."""
        xd = torch.cat([xd.to(step.sample.dtype), image[:, xd.shape[1] :]], dim=1)
        return self.family.to_model_input(xd, step.call)

    def _degrade(self, x0, mask, eps, noise: Noise) -> torch.Tensor:
        """a * Degrade(x0; mask) + b * eps, through the variance-preserving op (sagfast.engine.schedule)."""
        cfg = self.config
        xd = ops.degrade(x0, mask, eps, noise.abar, cfg.blur_kernel_size, cfg.blur_sigma, backend=cfg.backend)
        return xd if noise.scale is None else xd * noise.scale.view(-1, 1, 1, 1).to(xd.dtype)

    def _combine(self, o, o_deg, o_ptb, step: Step, c: int | None) -> torch.Tensor:
        """o[k] + s * (o_guide - o_deg) + s_pag * (o_cond - o_ptb) for each CFG chunk k (the terms this
        step runs), on the first `c` channels (None: all); the rest of o (learned variance) as the main
        pass gave it."""
        cfg = self.config
        whole = c is None or c == o.shape[1]
        part = (lambda t: t) if whole else (lambda t: t[:, :c].contiguous())
        terms = []
        if o_deg is not None:
            terms.append((cfg.scale, part(o[step.guide]), part(o_deg)))
        if o_ptb is not None:
            terms.append((step.pag_scale, part(o[step.cond]), part(o_ptb)))
        (scale, pos, neg), *extra = terms
        guided = ops.combine(part(o), pos, neg, scale, backend=cfg.backend, extra_terms=extra)
        return guided if whole else torch.cat([guided, o[:, c:]], dim=1)

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


def _within(interval: tuple, fraction: float) -> bool:
    return interval[0] <= fraction < interval[1]


def _first(timestep) -> float:
    """A call's timestep as a Python number (the first row's, when it is per row)."""
    return float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)


def _seeds_of(generator) -> list[int]:
    """The random mask's seeds: one per generator of the call (a list of generators gives each image
    its own mask, as it gives each image its own noise), the call's one generator's, else a fresh one."""
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    seeds = [g.initial_seed() for g in generators if isinstance(g, torch.Generator)]
    return seeds or [torch.Generator().seed()]


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
        if not guided.config.guides:
            out = self.model(**call, return_dict=False)[0]
        else:
            out = guided.step(call)
        return guided.family.wrap_output(out) if return_dict else (out,)
