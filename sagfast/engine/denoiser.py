"""The guided denoiser: what `pipe.unet` is while one call of an enabled pipeline runs.

`sagfast.enable` gives the pipeline a subclass of its own class (sagfast.api) whose `__call__` makes
a `GuidedCall` for that call, and whose `unet` property returns the call's `GuidedDenoiser` while
the call runs (in that thread) and the user's own model at any other time. The pipeline's loop,
scheduler and CFG line stay untouched. Per model call (one denoising step):

1. `plan`: which terms (sagfast.terms: SAG, PAG, ...) run their rows at this step, which only watch
   the main pass, each term's scale (a number or one per image), the guide and cond rows;
2. exact mode: the main pass on the pipeline's batch with the rows of the terms that do not need it,
   then the rows of those that do (SAG's degraded input, built from the main pass) in a second call;
   batched mode: all rows in one call;
3. the combine: `o[k] + sum_t s_t * (o[source_t] - o_t)` for each CFG chunk k, so that the pipeline's
   own CFG line gives `cfg(o_u, o_c) + terms`; or, where sagfast owns CFG (`cfg_scale`, `cfg_rule`),
   each image's full guided prediction R returned for both halves (the line then gives R).

Planning a step's terms (`plan_terms`, `variant_of`) and the combine (`combine`) are plain functions:
the modular guider (sagfast.guiders.Guidance) runs the same ones on its conditions' predictions.

No term is named here: a term's rows, attention rule, state and part of the combine are its own.
Everything a call keeps (terms' state, the random mask's generator) lives in its `GuidedCall` and goes
with it; only CUDA graphs outlive a call (sagfast.engine.cuda_graph keeps them per model).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from sagfast import ops
from sagfast.attention.capture import ACTIVE, Capture
from sagfast.config import PER_IMAGE, TERMS, SAGConfig
from sagfast.core.batch import gather_batch, join_calls, same_inputs, slice_batch, snapshot
from sagfast.core.schedule import Noise, evaluation_index, noise_of, prediction_of
from sagfast.engine.cuda_graph import graphs_of
from sagfast.terms import cfg
from sagfast.terms.base import Term, on
from sagfast.terms.sag import SAG, predicted_channels


@dataclasses.dataclass
class Step:
    """One model call of the pipeline, planned: its inputs, rows and terms."""

    sample: torch.Tensor
    call: dict
    b: int
    """Images in the call (rows per CFG chunk)."""
    chunks: int
    guide: slice | torch.Tensor
    """The guide branch's rows, one per image: uncond under CFG, else cond (an index tensor when
    images guided without CFG share a CFG batch)."""
    cond: slice
    """The conditional branch's rows (what PAG perturbs)."""
    uncond: slice | None
    noise: Noise
    prediction_type: str
    state_key: tuple
    """What batched-mode state must match to carry over from the previous step: the images (their
    count, each one's input shape, dtype, device), not the CFG layout (CFG's interval ending keeps it)."""
    guide_rows: tuple
    """`guide`'s rows on the host, one per image."""
    branches: tuple
    """Per image, the branch its guide row is in: "uncond" or "cond" (a term's state built on one
    branch is not that of the other)."""
    on: tuple
    """The terms that run their rows in this step."""
    watching: tuple
    """The terms that see the main pass (those `on`, and those only tracking it)."""
    scales: dict
    """term name -> its scale at this step (a number, or a [B] fp32 tensor on the device)."""
    cfg: object = None
    """Where sagfast owns CFG: the CFG scale (a number, or [B], 1 for images without CFG); else None."""
    index: int = 0
    """The step of the call (CFG-Zero*'s zero-init steps)."""
    variant: str = "exact"
    """"exact", "batched", or "mixed": batched mode where a term can build the rows of some images only
    before the main pass (`early`); the others' rows are built from it, in a second call."""
    early: dict = dataclasses.field(default_factory=dict)
    """Mixed variant: term name -> the images whose rows join the main call (the rest come after)."""
    reused: tuple = ()
    """Term refresh: the terms that run no rows in this step and add their kept difference instead."""

    @property
    def full(self) -> int:
        return self.sample.shape[0]


class GuidedCall:
    """One call of an enabled pipeline: its config, the call's arguments (defaults applied), capture,
    terms and state. Made when the call starts (the scheduler, the capture layer and the terms' layers
    are checked then, once), dropped when it ends."""

    def __init__(self, pipe, config: SAGConfig, family, arguments: dict, attribute: str | None = None):
        self.pipe = pipe
        self.config = config
        self.family = family
        self.attribute = attribute or family.attribute
        """The pipeline attribute whose model this call guides."""
        self.model = pipe.__dict__[self.attribute]
        family.check_scheduler(pipe.scheduler)
        self.arguments = arguments
        cfg.refuse_rescale(config, arguments.get("guidance_rescale"))
        layers, threshold = SAG.capture_of(config)
        self.layer_name, attn, owner, patch = family.resolve_layer(self.model, layers)
        self.capture = Capture(attn, owner, patch, config.backend, threshold, family.capture_processor)
        self.seeds = _seeds_of(arguments.get("generator"))
        self.graphs = graphs_of(self.model) if config.cuda_graph else None
        self.terms = tuple(term(self) for term in TERMS if term.requested(config))
        self.capture.ruled = frozenset(layer for term in self.terms for layer in term.layers)
        self.rule = cfg.rule_of(config) if cfg.owns(config) else None
        self.row_scales: dict = {}  # per-image scales and guide rows as device tensors, made once per call
        self.first_index = None
        """Where the call's first evaluation is in the scheduler's timesteps (img2img starts mid-way)."""
        self.last_timestep = None
        """Pipelines that run CFG as two calls per step (`Family.sequential_cfg`): the timestep of the
        latest model call, so that the second call of a step is known as the uncond one."""
        self.sequential: dict = {}
        """Those pipelines' branches between their calls (`sequential_step`)."""
        self.siblings = {self.attribute: self}
        """The guided calls of the same pipeline call, by attribute (a pipeline with two denoisers)."""
        self.denoiser = GuidedDenoiser(self)

    def join(self, other: GuidedCall) -> None:
        """Make `other` (the same pipeline call, another of its denoisers) a sibling: the pipeline's
        attribute then gives its denoiser, and both share the state of the pipeline's CFG calls (the
        uncond inputs do not change with the model: Wan 2.2's first low-noise step joins its branches
        with the high-noise stage's)."""
        self.siblings[other.attribute] = other
        other.siblings, other.sequential = self.siblings, self.sequential

    def denoiser_of(self, attribute: str) -> GuidedDenoiser:
        return self.siblings[attribute].denoiser

    @property
    def last_mask(self):
        """The [guide rows, h, w] SAG mask of the latest main pass (what the demo draws), or None."""
        sag = next((t for t in self.terms if t.name == "sag"), None)
        return sag.mask if sag is not None and SAG.records_mass(self.config) else None

    def position(self, timestep) -> tuple[int, int]:
        """(i, N): this evaluation is step i of the N steps this call runs, counted as diffusers' guiders
        count them (both evaluations of a Heun-type step are that step)."""
        scheduler = self.pipe.scheduler
        index = evaluation_index(scheduler, timestep)
        # Counted from the call's first evaluation, whichever denoiser made it (Wan 2.2's low-noise
        # stage goes on counting the steps of the high-noise stage, as diffusers' guiders do).
        first = self.siblings[self.family.attribute]
        if first.first_index is None:
            first.first_index = index
        order = max(1, int(getattr(scheduler, "order", 1)))
        steps = max(1, -(-(len(scheduler.timesteps) - first.first_index) // order))
        return (index - first.first_index) // order, steps

    def step(self, call: dict) -> torch.Tensor:
        """The guided prediction for one model call of the pipeline (`call`: the model's arguments)."""
        fam = self.family
        sample = call.pop(fam.sample_argument)
        g = fam.sequential_cfg(self.pipe, self.attribute, self.arguments)
        if g is not None:
            return self.sequential_step(sample, call, g)
        chunks = fam.cfg_chunks(self.pipe, self.arguments)
        if sample.shape[0] % chunks:
            raise ValueError(f"CFG is on but the model input batch {sample.shape[0]} is not [uncond, cond] (odd size)")
        return self.batch_step(sample, call, chunks)

    def batch_step(self, sample, call: dict, chunks: int, pipeline_cfg=None) -> torch.Tensor:
        """The guided prediction of a model input batch of `chunks` CFG chunks ([uncond, cond] for 2);
        `pipeline_cfg`: the scale the pipeline combines its CFG calls with, where it is not its `guidance_scale`
        (sequential CFG: Wan 2.2's guidance_scale_2, Flux's true_cfg_scale), else None."""
        config, fam = self.config, self.family
        full = sample.shape[0]
        timestep = call[fam.timestep_argument]
        needs_index = config.has_intervals or config.refreshes or (self.rule is not None and self.rule.needs_index)
        index, steps = self.position(timestep) if needs_index else (0, 1)
        f = index / steps
        if chunks == 2 and not _within(cfg.interval_of(config), f):
            # CFG outside its interval: the cond rows alone, returned for both halves, so that the
            # pipeline's CFG line o_u + g * (o_c - o_u) gives the guided cond prediction.
            b = full // 2
            rows = slice(fam.cond_chunk(2) * b, fam.cond_chunk(2) * b + b)
            out = self.guided_rows(sample[rows], slice_batch(call, full, rows), 1, f, index, cfg_off=True)
            return torch.cat([out, out])
        return self.guided_rows(sample, call, chunks, f, index, pipeline_cfg=pipeline_cfg)

    def sequential_step(self, sample, call: dict, g: float) -> torch.Tensor:
        """A pipeline that runs CFG as two model calls per step, cond then uncond, and combines them with
        `u + g * (c - u)` (WanPipeline). Both branches are joined into one [uncond, cond] batch and guided
        as any CFG batch (every term, both modes); the uncond branch's inputs are those of the previous
        step's uncond call (its negative embeddings: the pipeline hands them over only in that call):

        - the cond call, once an uncond call has been seen: the joined step runs; it returns its cond
          half c' and keeps its uncond half u';
        - the uncond call: u' when its inputs are those the joined step used (the sample, the timestep
          and every other input, compared); else (the first step, or inputs that changed) the joined
          step runs now with these inputs, and returns u'' = u' + g * (c' - c_r) / (1 - g), where c_r
          is what the cond call returned, so that the pipeline's line u'' + g * (c_r - u'') gives the
          joined step's guided prediction u' + g * (c' - u') exactly.

        So after the first step the uncond call costs nothing: batched mode makes one model call per
        step, exact mode two (its main pass and the degraded rows)."""
        timestep = call[self.family.timestep_argument]
        t = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
        second, self.last_timestep = t == self.last_timestep, t
        seq = self.sequential
        b = sample.shape[0]
        # Before any model call: the first cond call runs the model as it is, before any step is planned.
        self.check_images(b)
        # The pipeline edits some inputs in place between its calls (FluxPipeline's joint_attention_kwargs
        # get each branch's IP-Adapter embeddings): what is kept is a copy of the containers.
        call = snapshot(call)
        if g == 1.0:
            # The pipeline's line u + (c - u) is the cond call's output alone: the cond branch guided
            # as without CFG, handed to the uncond call as well (Wan 2.2's guidance_scale_2 = 1).
            if not second:
                seq["returned"] = self.batch_step(sample, call, 1)
                return seq["returned"]
            self.last_timestep = None
            return seq["returned"]
        if not second:  # the cond call
            seq["cond"], seq["kept"] = (sample, call), None
            if seq.get("uncond") is None:
                # A copy again: a model may edit what it is handed (FluxTransformer2DModel pops the
                # IP-Adapter embeddings out of its joint_attention_kwargs).
                seq["returned"] = self.model(sample, **snapshot(call), return_dict=False)[0]
                return seq["returned"]
            uncond = dict(seq["uncond"], **{self.family.timestep_argument: timestep})
            out = self.batch_step(torch.cat([sample, sample]), join_calls(uncond, call, b), 2, pipeline_cfg=g)
            seq["returned"], seq["kept"] = out[b:], (uncond, out[:b])
            return seq["returned"]
        self.last_timestep = None
        cond_sample, cond_call = seq["cond"]
        kept = seq["kept"]
        if kept is not None and same_inputs(sample, cond_sample) and same_inputs(call, kept[0]):
            return kept[1]
        # The first step, or inputs that changed since the cond call (a step callback's): the joined
        # step runs again with them (a second update of the terms' state in this step).
        seq["uncond"] = call
        out = self.batch_step(torch.cat([sample, cond_sample]), join_calls(call, cond_call, b), 2, pipeline_cfg=g)
        u, c = out[:b], out[b:]
        return u + (g / (1.0 - g)) * (c - seq["returned"])

    def guided_rows(
        self, sample, call: dict, chunks: int, fraction: float, index: int, cfg_off: bool = False, pipeline_cfg=None
    ) -> torch.Tensor:
        """The guided prediction of a batch of `chunks` CFG chunks at step `index` (`fraction` of the call)."""
        step = self.plan(sample, call, chunks, fraction, index, cfg_off, pipeline_cfg)
        step.variant, step.early = variant_of(self.config.mode, step)
        for term in self.terms:
            term.note_step(step)
        if not step.watching and not step.reused and step.cfg is None:
            return self.model(sample, **call, return_dict=False)[0]
        out = None
        if self.graphs is not None:
            out = self._graphed(step)
        if out is None:
            out = self.run_step(step.variant, step)
        return out

    def plan(
        self, sample, call: dict, chunks: int, fraction: float = 0.0, index: int = 0, cfg_off: bool = False, pipeline_cfg=None
    ) -> Step:
        """The step's rows and terms (see `Step`); `pipeline_cfg` as in `batch_step`."""
        fam = self.family
        full = sample.shape[0]
        b = full // chunks
        self.check_images(b)
        cond = slice(fam.cond_chunk(chunks) * b, fam.cond_chunk(chunks) * b + b)
        uncond = slice(fam.guide_chunk(chunks) * b, fam.guide_chunk(chunks) * b + b) if chunks == 2 else None
        guide = uncond if uncond is not None else cond
        guide_rows = tuple(range(guide.start, guide.stop))
        g = None
        if self.rule is not None and not cfg_off:
            g = self._cfg_scale(chunks, sample.device, pipeline_cfg)
            per_image = cfg.scales_of(self.config)
            if chunks == 2 and isinstance(per_image, tuple) and min(per_image) <= 1:
                # Images without CFG take their cond row as the guide branch (decided on the host).
                guide_rows = tuple((uncond.start if x > 1 else cond.start) + i for i, x in enumerate(per_image))
                guide = self.rows_tensor(guide_rows, sample.device)
            elif chunks == 2 and not torch.is_tensor(g) and g <= 1:
                # One scale <= 1 for all (clamped to 1): every image is without CFG, as a list of them.
                guide = cond
                guide_rows = tuple(range(cond.start, cond.stop))
        branches = tuple("uncond" if uncond is not None and uncond.start <= r < uncond.stop else "cond" for r in guide_rows)
        runs, watching, scales = plan_terms(self.terms, fraction, call[fam.timestep_argument])
        for term in self.terms:
            if isinstance(scales[term.name], tuple):
                scales[term.name] = self._scale_tensor(term.scale_field, scales[term.name], sample.device)
        noise = noise_of(self.pipe.scheduler, call[fam.timestep_argument], b, sample.device)
        state_key = (b, tuple(sample.shape[1:]), sample.dtype, sample.device)
        reused = ()
        if self.config.refreshes:
            # Term refresh: a term within its refresh interval adds its kept difference, and runs no rows.
            key = Term.refresh_key(state_key, branches)
            reused = tuple(t for t in runs if t.reuses(index, key))
            runs = tuple(t for t in runs if t not in reused)
            watching = tuple(t for t in watching if t not in reused or t.watches_between())
        return Step(
            sample,
            call,
            b,
            chunks,
            guide,
            cond,
            uncond,
            noise,
            prediction_of(self.pipe.scheduler),
            state_key,
            guide_rows,
            branches,
            runs,
            watching,
            scales,
            g,
            index,
            reused=reused,
        )

    def check_images(self, b: int) -> None:
        """A ValueError unless every per-image field has one value for each of the `b` images."""
        check_images(self.config, b)

    def _cfg_scale(self, chunks: int, device, pipeline_cfg=None):
        """The CFG scale where sagfast owns CFG: the config's (one per image: [B], 1 for the images
        without CFG), else the scale the pipeline combines its CFG with (`pipeline_cfg`, sequential CFG)
        or its guidance_scale."""
        g = pipeline_cfg
        if g is None:
            g = getattr(self.pipe, "guidance_scale", None) if hasattr(type(self.pipe), "guidance_scale") else None
            g = float(self.arguments.get("guidance_scale", 1.0) if g is None else g)
        g = cfg.call_scale(self.config, chunks, g)
        return self._scale_tensor(cfg.CFGRule.scale_field, g, device) if isinstance(g, tuple) else g

    def rows_tensor(self, rows: tuple, device) -> torch.Tensor:
        key = ("rows", rows, device)
        if key not in self.row_scales:
            self.row_scales[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return self.row_scales[key]

    def _scale_tensor(self, field: str, value: tuple, device) -> torch.Tensor:
        key = (field, value, device)
        if key not in self.row_scales:
            self.row_scales[key] = torch.tensor(value, dtype=torch.float32, device=device)
        return self.row_scales[key]

    def run_step(self, variant: str, step: Step) -> torch.Tensor:
        step = dataclasses.replace(step, variant=variant)
        if variant == "batched":
            out = self._pass(step, main=True, terms=step.on)
        elif variant == "mixed":
            out = self._pass(step, main=True, terms=step.on, part="early")
            late = self._pass(step, terms=[t for t in step.on if t.name in step.early], part="late")
            for name, early in step.early.items():
                rest = tuple(i for i in range(step.b) if i not in early)
                # The term's rows came as [early images][the rest]: back to image order.
                order = early + rest
                back = self.rows_tensor(tuple(order.index(i) for i in range(step.b)), step.sample.device)
                out[name] = (torch.cat([out[name], late[name]]) if early else late[name])[back]
        else:
            # With exact_pag_pass="degraded", the rows that do not need the main pass go with those that do.
            late = self.config.exact_pag_pass == "degraded" and any(t.needs_main for t in step.on)
            out = self._pass(step, main=True, terms=[t for t in step.on if not t.needs_main and not late])
            second = [t for t in step.on if t.needs_main or late]
            if second:
                out.update(self._pass(step, terms=second))
        if not step.on and not step.reused and step.cfg is None:
            return out["main"]  # tracking only: the prediction is the model's
        return self._combine(out, step)

    def _graphed(self, step: Step):
        why = []
        if step.sample.device.type != "cuda":
            why.append(f"CUDA graphs need CUDA tensors, got {step.sample.device.type}")
        for term in step.watching:
            why += term.graph_refusals(step)
        if self.rule is not None:
            why += self.rule.graph_refusals()
        if self.config.refreshes:
            why.append("term refresh keeps each term's difference between steps, outside the graph")
        if why:
            self.graphs.clear()  # e.g. the pipeline moved to the CPU: free the GPU memory of its graphs
            for reason in why:
                self.graphs.refuse(reason)
            return None
        inputs, state = self.graph_inputs(step)

        def fn(inp):
            s = dataclasses.replace(step, sample=inp["sample"], call=inp["call"], noise=Noise(*inp["noise"]), scales=inp["scales"])
            return self.run_step(step.variant, s)

        return self.graphs.run(self.graph_variant(step.variant, step), fn, inputs, state)

    def graph_variant(self, variant: str, step: Step) -> tuple:
        """What a graph of this step bakes in besides its inputs: the config, the terms the step runs,
        CFG, the prediction type, and the map size where the call's inputs give it (Flux: token grids
        4x8 and 8x4 pack to one shape)."""
        guide = tuple(step.guide.tolist()) if torch.is_tensor(step.guide) else (step.guide.start, step.guide.stop)
        zero = self.rule is not None and self.rule.zero(step.index)
        terms = (tuple(t.name for t in step.on), tuple(t.name for t in step.watching), step.cfg is not None, zero)
        early = tuple(sorted(step.early.items()))
        return (variant, terms, early, self.config, step.chunks, guide, step.prediction_type, self.family.map_size(step.call))

    def graph_inputs(self, step: Step):
        """(inputs, state) of the graphed step: what is copied into static buffers before each replay,
        and the persistent batched-mode buffers the step reads and writes in place."""
        device = step.sample.device
        # The timestep enters the graph as a device tensor, so one graph serves every step; so do the
        # scales that change per step (adaptive PAG) or per image (a constant one is part of the config
        # the graph is keyed by).
        call = dict(step.call, timestep=torch.as_tensor(step.call["timestep"], device=device))
        scales = {
            t.name: torch.as_tensor(step.scales[t.name], dtype=torch.float32, device=device)
            if torch.is_tensor(step.scales[t.name]) or step.scales[t.name] != getattr(self.config, t.scale_field)
            else step.scales[t.name]
            for t in step.on
        }
        n = step.noise
        inputs = {"sample": step.sample, "call": call, "noise": (n.a, n.b, n.abar, n.scale), "scales": scales}
        state = tuple(x for t in step.watching for x in t.graph_state(step))
        return inputs, state

    def _pass(self, step: Step, main: bool = False, terms=(), part: str | None = None) -> dict:
        """One model call on the rows [main batch][each term's rows: those without an attention rule
        first]. Returns each part's output by name ("main", the terms' names). `part` (mixed variant):
        "early", the rows of the images in `step.early` for the terms named there, built before the
        main pass; "late", the rest, built from it."""
        parts, inputs, rows, rules = [], [], [], []
        if main:
            parts.append(("main", step.full))
            inputs.append(step.sample)
            rows.append(slice(None))
        at = step.full if main else 0
        for term in sorted(terms, key=lambda t: t.layers_field is not None):
            if part is not None and term.name in step.early:
                early = step.early[term.name]
                images = early if part == "early" else tuple(i for i in range(step.b) if i not in early)
                if not images:
                    continue
                r = term.rows(dataclasses.replace(step, variant="batched" if part == "early" else "exact"), images)
            else:
                r = term.rows(step)
            n = r.sample.shape[0]
            parts.append((term.name, n))
            inputs.append(r.sample)
            rows.append(r.conditioning)
            if r.rule is not None:
                rules.append((slice(at, at + n), r.rule))
            at += n
        sample = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
        call = gather_batch(step.call, step.full, rows)
        capture = self.capture
        capture.reinstall()
        if main:
            for term in step.watching:
                term.before_main(step)
        capture.rules = tuple(rules)
        # The thread's capture for the pass is this call's: the switches and hooks on the model read it
        # (a pipeline with two denoisers runs either one's).
        token = ACTIVE.set(capture)
        try:
            o = self.model(sample, **call, return_dict=False)[0]
        finally:
            ACTIVE.reset(token)
            capture.disarm()
            capture.rules = ()
        out, at = {}, 0
        for name, n in parts:
            out[name] = o[at : at + n] if len(parts) > 1 else o
            at += n
        if main:
            for term in step.watching:
                term.after_main(step, out["main"])
        return out

    def _combine(self, out: dict, step: Step) -> torch.Tensor:
        return combine(out, step, self.family, self.rule, self.config.backend)


def _within(interval: tuple, fraction: float) -> bool:
    return interval[0] <= fraction < interval[1]


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


def plan_terms(terms, fraction: float, timestep) -> tuple:
    """(the terms that run their rows, the terms that watch the main pass, term name -> scale) at the step
    `fraction` (i / N) of a call whose model call has `timestep`: each term's `plan` and `scale` (a number,
    or a tuple with one per image). A term planned on whose scale is 0 for every image (adaptive PAG's
    scale reaching 0) neither runs nor watches. The guided call and the modular guider
    (sagfast.guiders.Guidance) plan their steps with it."""
    plans, scales = {}, {}
    for term in terms:
        scale = term.scale(timestep)
        plan = term.plan(fraction)
        plans[term] = None if plan == "on" and not on(scale) else plan
        scales[term.name] = scale
    runs = tuple(t for t in terms if plans[t] == "on")
    watching = tuple(t for t in terms if plans[t] is not None)
    return runs, watching, scales


def variant_of(mode: str, step: Step) -> tuple:
    """(variant, early) of a planned step (see `Step`): "batched" where `mode` is and every term that runs
    can build its rows before the main pass, "mixed" where a term that needs the main pass can for some
    images only (their guide branch changed: CFG's interval ended for the images with CFG; each image's
    step is then what it would be alone, batched or exact), else "exact"."""
    if mode != "batched" or not step.on:
        return "exact", {}
    everyone = tuple(range(step.b))
    ready = {t.name: t.ready(step) for t in step.on}
    if all(r == everyone for r in ready.values()):
        return "batched", {}
    if any(ready[t.name] for t in step.on if t.needs_main):
        return "mixed", {name: r for name, r in ready.items() if r != everyone}
    return "exact", {}


def check_images(config: SAGConfig, b: int) -> None:
    """A ValueError unless every per-image field of `config` has one value for each of the `b` images."""
    for name in PER_IMAGE:
        value = getattr(config, name)
        if isinstance(value, tuple) and len(value) != b:
            raise ValueError(
                f"{name} has {len(value)} values, but this call makes {b} images (batch size x "
                f"num_images_per_prompt): give one value per image, or one number for all"
            )


def combine(out: dict, step: Step, family, rule, backend: str = "auto") -> torch.Tensor:
    """`o[k] + sum_t s_t * (o[source_t] - o_t)` for each CFG chunk k (the terms this step runs), or
    where sagfast owns CFG each image's guided prediction for every chunk; on the predicted channels
    (the rest of o, a learned variance, as the main pass gave it)."""
    fam, o = family, out["main"]
    o_image = fam.to_image(o, step.call)
    c = predicted_channels(o_image, fam.to_image(step.sample, step.call)) if o_image is o else o.shape[1]
    whole = c == o.shape[1]

    def part(t):
        return t if whole else t[:, :c].contiguous()

    terms = [(step.scales[t.name], part(o[step.guide if t.source == "guide" else step.cond]), part(out[t.name])) for t in step.on]
    for t, (_, pos, neg) in zip(step.on, terms):
        if t.refresh > 1:  # term refresh: its difference, for the steps that reuse it
            t.keep(step, pos.float() - neg.float())
    # Term refresh: the terms that reuse their kept difference d add s * (d - 0).
    kept = [(step.scales[t.name], t.kept()) for t in step.reused]
    if step.cfg is None:
        terms += [(s, d.to(o.dtype), torch.zeros_like(d, dtype=o.dtype)) for s, d in kept]
        if not terms:
            return o
        (scale, pos, neg), *extra = terms
        guided = ops.combine(part(o), pos, neg, scale, backend=backend, extra_terms=extra)
        return guided if whole else torch.cat([guided, o[:, c:]], dim=1)
    # sagfast owns CFG: each image's prediction R in fp32, returned for every chunk.
    o_c = part(o[step.cond]).float()
    if step.chunks == 2:
        base, cfg_terms = rule.combine(part(o[step.uncond]).float(), o_c, step.cfg, step.index)
    else:
        base, cfg_terms = o_c, []
    terms = cfg_terms + [(s, pos.float(), neg.float()) for s, pos, neg in terms] + [(s, d, torch.zeros_like(d)) for s, d in kept]
    guided = base
    if terms:
        (scale, pos, neg), *extra = terms
        guided = ops.combine(base.contiguous(), pos.contiguous(), neg.contiguous(), scale, backend=backend, extra_terms=extra)
    if rule.zero(step.index):
        guided = torch.zeros_like(guided)
    guided = guided.to(o.dtype)
    chunks = [guided if whole else torch.cat([guided, o[k * step.b : (k + 1) * step.b, c:]], dim=1) for k in range(step.chunks)]
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]
