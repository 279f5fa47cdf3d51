"""sagfast's guidance as a diffusers guider, for diffusers' modular pipelines.

    pipe.update_components(guider=Guidance(guidance_scale=5.0, scale=0.75, pag_scale=3.0))

`Guidance` takes `sagfast.enable`'s keywords (every term and CFG rule of `sagfast.SAGConfig`) and runs
them as one diffusers `BaseGuidance`. A modular pipeline's denoise loop runs a guider's conditions one
model pass each (`prepare_inputs`, then per condition `prepare_models`, the model, `cleanup_models`,
then the guider's call). This guider's conditions at a step are derived from the terms, with the same
planning as the guided call of `sagfast.enable` (sagfast.engine.denoiser: `plan_terms`, `variant_of`):

- cond; uncond where CFG runs at this step (`guidance_scale > 1`, the step within `start`/`stop`);
- one condition per term that runs its rows at this step (each term's `plan` and scale), in the
  terms' order, with the inputs of the branch its rows derive from (`Term.source`: cond, or the guide
  branch: uncond under CFG, else cond); the terms whose rows are built from the main pass (SAG's
  degraded input) last.

What a condition's pass runs is the terms' own code, not a copy: the guide condition's pass calls
every watching term's `before_main` (SAG arms its capture: sagfast's capture processor on the capture
layer records the attention mass and mask), and a term's condition takes `Term.rows` of its pass's
inputs: its sample replaces the model's input (SAG's degraded latent), its rule (an AttentionRule,
SkipRule or InputRule: PAG's identity attention, SEG's blurred queries, STG's skipped blocks) runs for
every row of that pass, through sagfast's capture switch and block hooks. Each such module carries a
diffusers hook for the condition's pass only, so that `sagfast.modular.batch_guidance`, which joins
the conditions into one model call, applies it to that condition's rows only. The call combines the
predictions with the engine's `combine`: the terms' `+ s_t * (o[source_t] - o_t)`, then diffusers'
CFG line (`cfg_rule="cfg"`, as the standard pipeline applies its own), or the rule's combine (APG,
CFG-Zero*, ...).

`SelfAttentionGuidance` is `Guidance` under diffusers-style field names (`sag_scale`,
`perturbed_guidance_scale`, ...), SAG and PAG only.

A guider is handed the denoiser and the timestep, never the scheduler, and SAG's degraded input needs
the step's noise level: the guider reads it at each step from the `scheduler` of the modular pipeline
that is running it (`running_pipeline`; any scheduler sagfast accepts, any betas). Driven outside a
modular pipeline, `bind(pipe)` names the pipeline whose scheduler it reads.

Whatever it puts on a model comes off when a call fails: the step's layers and scheduler are checked
before anything is installed, an exception in its hooks or in the model's pass takes everything off
before it propagates (diffusers' loop calls no `cleanup_models` then), and hooks an interrupt left
between passes do nothing and are taken off by the model's next pass.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput
from diffusers.hooks import HookRegistry, ModelHook

from sagfast.api import make_config
from sagfast.attention.capture import ACTIVE, BlockInputHook, BlockSkipHook, Capture, CaptureSwitch, input_grid, switch_for
from sagfast.config import FIELDS, TERMS, SAGConfig
from sagfast.core.schedule import check_scheduler, noise_of, prediction_of
from sagfast.core.settings import check_interval, check_real
from sagfast.engine.denoiser import Step, check_images, combine, plan_terms, variant_of
from sagfast.families import family_of_model
from sagfast.terms import cfg
from sagfast.terms.sag import SAG

CAPTURE_HOOK = "sagfast_sag_capture"
RULE_HOOK = "sagfast_{}_rule"
"""The diffusers hook a term's condition puts on each module its rule changes (by term name)."""


def model_call(model, args: tuple, kwargs: dict) -> dict:
    """A denoiser call's inputs by name (the SDXL loop passes the latent and the timestep by position),
    as the guided denoiser of `sagfast.enable` hands them to the terms."""
    if not args:
        return dict(kwargs)
    names = list(forward_parameters(type(getattr(model, "_orig_mod", model))))
    return {**dict(zip(names, args)), **kwargs}


@functools.cache
def forward_parameters(cls: type) -> tuple:
    return tuple(inspect.signature(cls.forward).parameters)[1:]  # after self


def running_pipeline(component):
    """The modular pipeline that has `component` among its components and is running it now, or None.

    A guider is handed the model and the timestep, never the pipeline; but diffusers' modular loop calls
    it from inside `ModularPipeline.__call__`, whose pipeline (and each block's `components` argument)
    is on the call stack: the innermost pipeline there that holds this guider is the one stepping the
    latents, whatever it was bound to.
    """
    from diffusers.modular_pipelines import ModularPipeline

    frame = inspect.currentframe()
    try:
        while frame is not None:
            for value in frame.f_locals.values():
                if isinstance(value, ModularPipeline) and any(c is component for c in value.components.values()):
                    return value
            frame = frame.f_back
    finally:
        del frame  # a frame held in a local keeps its callers alive (a reference cycle)
    return None


class LayerHook(ModelHook):
    """A diffusers hook that runs a module through `forward(original_forward, module, *args, **kwargs)`
    for one condition's pass: the capture layer under the guide condition's capture, the modules a
    term's rule changes under that term's rule. While `live()` is false (a hook a failed call left on
    the model) it runs the module's own forward."""

    def __init__(self, forward, live):
        super().__init__()
        self.forward = forward
        self.live = live

    def new_forward(self, module, *args, **kwargs):
        if self.live():
            return self.forward(self.fn_ref.original_forward, module, *args, **kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)


def under(capture: Capture):
    """A LayerHook forward that runs its module with `capture` as the thread's active capture: what
    sagfast's switch on an attention layer (installed for the step) and its block hooks read, so that
    the module does for every row of the pass what the engine does for a term's rows (a rule), or
    records the mass (the armed capture). A block's hooks are torch hooks that run outside `forward`
    (and a joined call recomputes a condition's rows through `forward` alone): they are called here."""

    def forward(original, module, *args, **kwargs):
        token = ACTIVE.set(capture)
        try:
            if hasattr(module, "set_processor"):  # an attention layer: its processor is the switch
                return original(*args, **kwargs)
            changed = BlockInputHook()(module, args, kwargs)
            if changed is not None:
                args, kwargs = changed
            out = original(*args, **kwargs)
            skipped = BlockSkipHook()(module, args, kwargs, out)
            return out if skipped is None else skipped
        finally:
            ACTIVE.reset(token)

    return forward


def rule_capture(config: SAGConfig) -> Capture:
    """A capture that records nothing and holds a term condition's rule for every row of its pass (its
    `rules`, set when the pass's inputs are known: SEG's rule depends on the image size)."""
    return Capture(None, None, 1, config.backend, SAG.capture_of(config)[1], None)


def jsonable(value):
    """A config value as JSON keeps it (tuples as lists), so that a saved and loaded config is equal."""
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class GuiderCall:
    """What the terms of one pipeline call read of the call that made them (`Term(call)`, as a
    `GuidedCall` of `sagfast.enable` is for them): the config, the denoiser and its family, SAG's
    capture, the terms and the CFG rule. Made at the call's first step, dropped with the next call."""

    graphs = None
    """No CUDA graphs: the modular loop runs the passes."""

    def __init__(self, config: SAGConfig, family, model, position):
        self.config, self.family, self.model = config, family, model
        self.step_position = position
        """() -> (i, N): the step the guider was set to, of the call's N (diffusers' loop counts them)."""
        # The random mask's seed: a guider never sees the call's generator.
        self.seeds = [torch.Generator().seed()]
        requested = [term for term in TERMS if term.requested(config)]
        self.layer_name = self.capture = None
        if any(term.needs_main for term in requested):
            layers, threshold = SAG.capture_of(config)
            self.layer_name, attn, owner, patch = family.resolve_layer(model, layers)
            self.capture = Capture(attn, owner, patch, config.backend, threshold, family.capture_processor)
        self.terms = tuple(term(self) for term in requested)
        self.by_name = {term.name: term for term in self.terms}
        self.rule = cfg.rule_of(config)
        self.tensors: dict = {}

    def position(self, timestep) -> tuple[int, int]:
        """(i, N) of the model call at `timestep`, as `GuidedCall.position` (TPG's permutation of step i):
        the step diffusers' loop set the guider to."""
        return self.step_position()

    def rows_tensor(self, rows: tuple, device) -> torch.Tensor:
        key = (rows, device)
        if key not in self.tensors:
            self.tensors[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return self.tensors[key]


def planner(term_class, config: SAGConfig):
    """A term of `term_class` for planning only: `plan` and `scale` read its config alone, and the
    conditions of a step are decided (`prepare_inputs`) before the guider is handed the model that
    `Term(call)` resolves its layers on."""
    term = object.__new__(term_class)
    term.config = config
    return term


REFUSED = {
    cfg.CFGRule.scale_field: "guidance_scale",
    cfg.CFGRule.interval_field: "start and stop",
}
"""SAGConfig fields a Guidance takes under diffusers' guider names."""


class Guidance(BaseGuidance):
    """Every term and CFG rule of `sagfast.enable` as one diffusers guider.

    Args:
        guidance_scale: the CFG scale (sagfast's `cfg_scale`); at or below 1 there is no unconditional
            pass and the terms of the guide branch (SAG) guide the conditional one.
        start, stop: the steps with CFG, `start <= step / steps < stop` (sagfast's `cfg_interval`).
        enabled: diffusers' switch; a disabled guider runs the conditional pass alone.
        **keywords: `sagfast.enable`'s keywords (`sagfast.SAGConfig`'s fields: `scale`, `pag_scale`,
            `seg_scale`, `stg_scale`, their layers and intervals, `mode`, `cfg_rule`, ...), checked by
            SAGConfig's checks when the guider is made. `cuda_graph` is not taken (the modular loop runs
            the passes).
    """

    _input_predictions = ["pred_cond", "pred_uncond", *(f"pred_{term.name}" for term in TERMS)]
    field_names: dict = {}
    """SAGConfig field -> the name this guider takes it under, where it differs (the subclass's names),
    for the errors of checks made when the model is known (layer identifiers)."""

    def __init__(self, guidance_scale: float = 7.5, start: float = 0.0, stop: float = 1.0, enabled: bool = True, **keywords):
        problems = [f"{name} is this guider's {ours}" for name, ours in REFUSED.items() if name in keywords]
        if keywords.get("cuda_graph"):
            problems.append("cuda_graph is not taken: diffusers' modular loop runs the passes")
        g, problem = check_real("guidance_scale", guidance_scale, low=0.0)
        interval, interval_problem = check_interval("(start, stop)", (start, stop))
        problems += [p for p in (problem, interval_problem) if p is not None]
        if problems:
            raise ValueError("invalid Guidance: " + "; ".join(problems))
        config = make_config(None, {**keywords, cfg.CFGRule.scale_field: g, cfg.CFGRule.interval_field: interval})
        self.setup(config, interval, enabled)
        # diffusers' config (save_pretrained / from_pretrained): the keywords given, as checked.
        given = {name: jsonable(getattr(config, name)) for name in keywords}
        self.register_to_config(guidance_scale=g, start=interval[0], stop=interval[1], enabled=enabled, **given)

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers passes `__init__` only the config entries its signature names: a guider that takes
        sagfast's keywords (`**keywords`) takes every SAGConfig field of the config too."""
        parameters = inspect.signature(cls.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return super().extract_init_dict(config_dict, **kwargs)
        fields = {k: v for k, v in config_dict.items() if k in FIELDS and k not in parameters}
        fields.update({k: kwargs.pop(k) for k in list(kwargs) if k in FIELDS and k not in parameters})
        init, unused, hidden = super().extract_init_dict({k: v for k, v in config_dict.items() if k not in fields}, **kwargs)
        return {**init, **fields}, unused, hidden

    def setup(self, config: SAGConfig, interval: tuple, enabled: bool) -> None:
        """The guider's state for `config` (checked); `interval`: BaseGuidance's start and stop."""
        if config.refreshes:
            fields = [t.refresh_field for t in TERMS if getattr(config, t.refresh_field) != 1]
            raise ValueError(
                f"invalid Guidance: term refresh ({', '.join(fields)}) is not offered by the modular guider; use sagfast.enable"
            )
        super().__init__(interval[0], interval[1], enabled)
        self.settings = config
        """The guider's sagfast configuration (its `cfg_scale` is `guidance_scale`)."""
        self.guidance_scale = cfg.scales_of(config)
        self.pipe = None
        self._planners = tuple(planner(term, config) for term in TERMS if term.requested(config))
        self._plan = None
        """(CFG on, the names of the terms that run, of those that watch, term name -> scale) at this step."""
        self._call = None
        """This pipeline call's GuiderCall (terms, capture, rule), made at its first step."""
        self._main = None
        """This step's main pass (the guide condition's inputs) as the engine's Step."""
        self._main_seen = False
        """Whether the watching terms have seen the main pass's output (`after_main`) this step."""
        self._batches = []
        self._handles = []
        """Forward pre-hooks this condition's pass put on the denoiser."""
        self._hooks = []
        """(registry, name) of the diffusers hooks this condition's pass put on."""
        self._step_handles = []
        """Hooks kept to the guider's call: the map-size recorder must see the guide rows' pass, which
        `batch_guidance` runs after the condition's cleanup, when it joins the calls; the pass watch."""
        self._switched = []
        """(layer, its own processor) of the layers given sagfast's capture switch for the step."""
        self._token = object()
        """What the installed hooks belong to: replaced when they are all taken off, so that a hook still
        running (torch runs a module's pre-hooks from a copy of its list) or left behind does nothing."""
        self._epoch = 0
        """Counts `prepare_models` and `cleanup_models` calls: every model pass of a condition follows one."""
        self._pass_epoch = self._watched = None
        """The epoch at which the watched denoiser's last pass began; that denoiser."""

    def bind(self, pipe) -> Guidance:
        """Read the noise level from `pipe.scheduler` at every step (a pipeline, or anything with a
        `scheduler`) where no modular pipeline holding the guider runs it (a loop of your own): in
        one, its own scheduler is read. Returns the guider."""
        if getattr(pipe, "scheduler", None) is None:
            raise ValueError(
                f"{type(self).__name__}.bind takes the pipeline whose scheduler it reads the noise level from; "
                f"this {type(pipe).__name__} has no `scheduler`"
            )
        self.pipe = pipe
        return self

    # -- which conditions run -------------------------------------------------------------------------

    def planned(self) -> tuple:
        """(CFG on, the names of the terms that run their rows, of those that watch the main pass, term
        name -> scale) at this step."""
        if self._plan is None:
            self._plan = self._make_plan()
        return self._plan

    def _make_plan(self) -> tuple:
        g, config = self.guidance_scale, self.settings
        if not self._enabled:
            return False, (), (), {}
        if self._num_inference_steps is None:  # asked before the loop (which embeddings to encode)
            return g > 1, (), (), {}
        fraction = self._step / self._num_inference_steps
        start, stop = cfg.interval_of(config)
        runs, watching, scales = plan_terms(self._planners, fraction, self._timestep)
        return g > 1 and start <= fraction < stop, tuple(t.name for t in runs), tuple(t.name for t in watching), scales

    def _is_cfg_enabled(self) -> bool:
        return self.planned()[0]

    @property
    def _guide_index(self) -> int:
        return 1 if self._is_cfg_enabled() else 0

    def _conditions(self) -> list:
        """(tuple index of the inputs, prediction name) per condition: cond, uncond with CFG, then each
        running term's on its source branch's inputs, those built from the main pass last."""
        cfg_on, runs, _, _ = self.planned()
        conditions = [(0, "pred_cond"), (1, "pred_uncond")][: 1 + cfg_on]
        kinds = {type(t).name: type(t) for t in self._planners}
        for name in sorted(runs, key=lambda n: kinds[n].needs_main):
            conditions.append((self._guide_index if kinds[name].source == "guide" else 0, f"pred_{name}"))
        return conditions

    @property
    def num_conditions(self) -> int:
        return len(self._conditions())

    @property
    def is_conditional(self) -> bool:
        """Whether the condition prepared last takes the conditional inputs (read by the SDXL loop's
        ControlNet guess mode)."""
        return self._conditions()[self._count_prepared - 1][0] == 0

    def _term_of(self, prediction: str):
        """The term whose rows a condition's prediction is, or None (cond, uncond)."""
        name = prediction.removeprefix("pred_")
        return self._call.by_name.get(name) if self._call is not None and prediction not in ("pred_cond", "pred_uncond") else None

    def needs_predictions(self) -> bool:
        """Whether the condition prepared next takes the earlier conditions' predictions as input (SAG's
        degraded rows in exact mode, or on batched mode's first step): `batch_guidance` then runs the
        calls it has deferred before preparing it."""
        conditions = self._conditions()
        if self._count_prepared >= len(conditions):
            return False
        term = self._term_of(conditions[self._count_prepared][1])
        return term is not None and term.needs_main and (self._main is None or self._main.variant != "batched")

    def set_state(self, step: int, num_inference_steps: int, timestep) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self._plan = self._main = None
        self._main_seen = False
        self._remove_all()  # what a failed call of this guider left on a model

    def prepare_inputs(self, data: dict) -> list:
        self._batches = [self._prepare_batch(data, i, name) for i, name in self._conditions()]
        return self._batches

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        self._batches = [self._prepare_batch_from_block_state(input_fields, data, i, name) for i, name in self._conditions()]
        return self._batches

    # -- the passes ----------------------------------------------------------------------------------

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        index = self._count_prepared
        self._count_prepared += 1
        self._epoch += 1
        # diffusers' loop calls no cleanup_models when a step fails: whatever fails here, nothing is
        # left on the model.
        try:
            if index == 0:
                self._check_step(denoiser)
            if index == self._guide_index:
                self._main_pass(denoiser)
            term = self._term_of(self._conditions()[index][1])
            if term is not None:
                self._term_pass(denoiser, term)
        except BaseException:
            self._remove_all()
            raise

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        self._epoch += 1
        for registry, name in self._hooks:
            registry.remove_hook(name, recurse=False)
        self._hooks = []
        self._remove(self._handles)

    def field_name(self, field: str) -> str:
        return self.field_names.get(field, field)

    def _check_step(self, denoiser) -> None:
        """Resolve and check everything this step's conditions need (the terms' layers, the capture
        layer, the scheduler) before the first of them installs anything; then give the step's
        attention layers sagfast's capture switch (dormant outside this guider's hooks)."""
        config = self.settings
        family = family_of_model(denoiser)
        if self._call is None or self._step == 0 or self._call.model is not denoiser:
            for term in self._planners:
                type(term).check_family(family)
                if term.layers_field and term.layers_kind == "attention":
                    # The layers, checked under this guider's name for them (Term(call) quotes sagfast's).
                    family.matching_layers(denoiser, getattr(config, term.layers_field), self.field_name(term.layers_field))
            self._call = GuiderCall(config, family, denoiser, lambda: (self._step, self._num_inference_steps))
        call = self._call
        _, runs, watching, _ = self.planned()
        if any(call.by_name[name].needs_main for name in watching):
            check_scheduler(self._scheduler())
        layers = [call.capture.attn] if watching and call.capture is not None else []
        layers += [layer for name in runs for layer in call.by_name[name].layers if hasattr(layer, "set_processor")]
        for layer in dict.fromkeys(layers):
            if not isinstance(layer.processor, CaptureSwitch):
                own = layer.processor
                layer.set_processor(switch_for(layer)(own))
                self._switched.append((layer, own))

    def _step_of(self, sample, call: dict) -> Step:
        """A pass's inputs as the engine's Step: one branch (the pass's rows, B of them) of this step."""
        _, runs, watching, scales = self.planned()
        b = sample.shape[0]
        rows = slice(0, b)
        noise = prediction = None
        terms = self._call.by_name
        if any(terms[name].needs_main for name in watching):
            scheduler = self._scheduler()
            noise, prediction = noise_of(scheduler, self._timestep, b, sample.device), prediction_of(scheduler)
        branch = "uncond" if self._is_cfg_enabled() else "cond"
        return Step(
            sample,
            call,
            b,
            1,
            rows,
            rows,
            None,
            noise,
            prediction,
            (b, tuple(sample.shape[1:]), sample.dtype, sample.device),
            tuple(range(b)),
            (branch,) * b,
            tuple(terms[name] for name in runs),
            tuple(terms[name] for name in watching),
            self._scale_tensors(scales, sample.device),
            None,
            self._step,
        )

    def _scale_tensors(self, scales: dict, device) -> dict:
        """Per-image scales (tuples) as [B] fp32 tensors, as the engine hands them to the combine."""
        return {k: torch.tensor(v, dtype=torch.float32, device=device) if isinstance(v, tuple) else v for k, v in scales.items()}

    def _main_pass(self, denoiser) -> None:
        """The guide condition's pass: the engine's main pass for the terms (`before_main`), whose
        capture (SAG's) runs on this condition's rows."""
        self._watch(denoiser)
        family, call = self._call.family, self._call
        _, _, watching, _ = self.planned()

        def main(module, args, kwargs):
            inputs = model_call(module, args, kwargs)
            sample = inputs.pop(family.sample_argument)
            check_images(self.settings, sample.shape[0])
            step = self._step_of(sample, inputs)
            variant, _ = variant_of(self.settings.mode, step)
            # "mixed" needs images whose guide branch changed within one batch; a guider's batch has one.
            step.variant = "batched" if variant == "batched" else "exact"
            for term in call.terms:
                term.note_step(step)
            for term in step.watching:
                term.before_main(step)
            self._main, self._main_seen = step, False

        self._handles.append(denoiser.register_forward_pre_hook(self._guarded(main), with_kwargs=True))
        capture = call.capture
        if capture is None or not watching:
            return
        self._hook(denoiser, capture.attn, under(capture), CAPTURE_HOOK)

        def record_hw(module, args, kwargs):
            # The map's grid from the owner's input (the engine's map hook, for the armed capture).
            if capture.hw is None:
                capture.hw = input_grid(
                    args[0] if args else kwargs[family.sample_argument if module is denoiser else "hidden_states"], capture.patch
                )

        self._step_handles.append(capture.owner.register_forward_pre_hook(self._guarded(record_hw), with_kwargs=True))

    def _after_main(self, guide: torch.Tensor) -> None:
        """The watching terms see the main pass's output (the guide condition's prediction), once a step."""
        if self._main_seen or self._main is None:
            return
        self._main_seen = True
        for term in self._main.watching:
            term.after_main(self._main, guide)

    def _term_pass(self, denoiser, term) -> None:
        """A term's condition: its rows of this pass's inputs (`Term.rows`) replace the model's input, and
        its rule runs on every row of the pass (a diffusers hook on each module of the term's layers)."""
        self._watch(denoiser)
        family = self._call.family
        holder = rule_capture(self.settings)

        def enter(module, args, kwargs):
            inputs = model_call(module, args, kwargs)
            sample = inputs.pop(family.sample_argument)
            main = self._main
            if term.needs_main and main.variant != "batched":
                self._after_main(self._batches[self._guide_index].noise_pred)
            step = dataclasses.replace(self._step_of(sample, inputs), variant=main.variant)
            rows = term.rows(step)
            holder.rules = ((slice(None), rows.rule),) if rows.rule is not None else ()
            if args:
                return (rows.sample, *args[1:]), kwargs
            return args, {**kwargs, family.sample_argument: rows.sample}

        self._handles.append(denoiser.register_forward_pre_hook(self._guarded(enter), with_kwargs=True))
        for layer in term.layers:
            self._hook(denoiser, layer, under(holder), RULE_HOOK.format(term.name))

    def _remove_all(self) -> None:
        """Take off everything this guider put on any model: after its call, at the next step, and when a
        call fails."""
        self._token = object()
        self._watched = None
        for registry, name in self._hooks:
            registry.remove_hook(name, recurse=False)
        self._hooks = []
        self._remove(self._handles)
        self._remove(self._step_handles)
        for layer, own in self._switched:
            if isinstance(layer.processor, CaptureSwitch) and layer.processor.inner is own:
                layer.set_processor(own)
        self._switched = []

    def _guarded(self, body):
        """`body` as a hook of the current installation: when it raises, everything this guider installed
        comes off before the exception goes on (diffusers' loop then unwinds without `cleanup_models`);
        once the installation is gone it does nothing (returns None)."""
        token = self._token

        def run(*args, **kwargs):
            if token is not self._token:
                return None
            try:
                return body(*args, **kwargs)
            except BaseException:
                self._remove_all()
                raise

        return run

    def _live(self):
        token = self._token
        return lambda: token is self._token

    def _watch(self, denoiser) -> None:
        """Hooks on the denoiser, kept to the guider's call, for what fails outside this guider's own code:
        when the model's forward raises, everything comes off; and a pass that no `prepare_models` or
        `cleanup_models` of this guider preceded (the model running for another guider after a call that
        was interrupted between its passes) takes everything off before it runs."""
        if self._watched is denoiser:
            return
        self._watched, self._pass_epoch = denoiser, None

        def pass_begins(module, args, kwargs):
            if self._pass_epoch == self._epoch:
                self._remove_all()
            self._pass_epoch = self._epoch

        def pass_ends(module, args, kwargs, output):
            if output is None:  # torch's always_call hooks get no output when the forward raised
                self._remove_all()

        self._step_handles.append(denoiser.register_forward_pre_hook(self._guarded(pass_begins), with_kwargs=True))
        self._step_handles.append(denoiser.register_forward_hook(self._guarded(pass_ends), with_kwargs=True, always_call=True))

    def _hook(self, denoiser, module: torch.nn.Module, forward, name: str) -> None:
        """A diffusers hook on `module` that runs `forward` for this condition's pass, taken off by
        `cleanup_models`."""
        self._watch(denoiser)
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(LayerHook(self._guarded(forward), self._live()), name)
        self._hooks.append((registry, name))

    @staticmethod
    def _remove(handles: list) -> None:
        for handle in handles:
            handle.remove()
        handles.clear()

    def _scheduler(self):
        pipe = running_pipeline(self)
        pipe = self.pipe if pipe is None else pipe
        if pipe is None:
            raise RuntimeError(
                f"{type(self).__name__} needs the pipeline's scheduler for the noise level of SAG's degraded pass. "
                "It reads it from the modular pipeline it is a component of while that pipeline runs it; run "
                "outside one, it is only handed the model: set it with `guider.bind(pipe)` (anything with a `scheduler`)"
            )
        return pipe.scheduler

    # -- the combine ---------------------------------------------------------------------------------

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None, **predictions):
        self._remove_all()
        cfg_on, runs, watching, scales = self.planned()
        if self._call is None:
            raise RuntimeError(f"{type(self).__name__} combines the predictions of passes it prepared (prepare_models)")
        call, b = self._call, pred_cond.shape[0]
        guide = pred_uncond if cfg_on else pred_cond
        if watching:
            self._after_main(guide)  # batched mode records this step's eps and mask for the next
        main = self._main
        sample, inputs = (main.sample, main.call) if main is not None else (pred_cond, {})
        plain = cfg.is_plain(self.settings)
        if cfg_on:
            o, chunks, uncond, cond = torch.cat([pred_uncond, pred_cond]), 2, slice(0, b), slice(b, 2 * b)
        else:
            o, chunks, uncond, cond = pred_cond, 1, None, slice(0, b)
        # The CFG scale where the rule combines (as the engine where sagfast owns CFG): none where CFG's
        # interval leaves this step out (the cond prediction and the terms), 1 in a call without CFG.
        g = None if plain or (not cfg_on and self.guidance_scale > 1) else (self.guidance_scale if cfg_on else 1.0)
        step = Step(
            sample,
            inputs,
            b,
            chunks,
            uncond if cfg_on else cond,
            cond,
            uncond,
            None,
            None,
            None,
            (),
            (),
            tuple(call.by_name[name] for name in runs),
            (),
            self._scale_tensors(scales, o.device),
            g,
            self._step,
        )
        out = {"main": o, **{name: predictions[f"pred_{name}"] for name in runs}}
        guided = combine(out, step, call.family, call.rule, self.settings.backend)
        if plain and cfg_on:
            # o[k] + terms for each branch, then CFG's line, as the standard pipeline applies its own.
            guided = guided[:b] + self.guidance_scale * (guided[b:] - guided[:b])
        return GuiderOutput(pred=guided[:b], pred_cond=pred_cond, pred_uncond=pred_uncond)


class SelfAttentionGuidance(Guidance):
    """Classifier-free guidance plus SAG (Hong et al., ICCV 2023), and optionally PAG (Ahn et al. 2024),
    as a diffusers guider under diffusers-style field names: `Guidance` with `scale=sag_scale`,
    `pag_scale=perturbed_guidance_scale`, ... (`cfg + sag_scale * (o_guide - o_degraded) +
    perturbed_guidance_scale * (o_cond - o_perturbed)`).

    Args:
        guidance_scale: CFG scale; at or below 1 there is no unconditional pass and SAG guides the
            conditional branch. CFG runs on every step.
        sag_scale: SAG scale s in `cfg + s * (o_guide - o_degraded)`; 0 runs no degraded pass.
        sag_layers: the capture layer, as sagfast's `layers`: "mid" or a module name.
        threshold: the mask is `attention mass > threshold` (mass averaged over heads; 1 is the mean).
        blur_kernel_size, blur_sigma: the Gaussian blur of the predicted x0 under the mask.
        mode: "exact" (the degraded pass from this step's guide prediction: two model calls per step when
            batched) or "batched" (from the previous step's eps and mask: one call when batched; the
            first step is exact).
        backend: the ops' backend ("auto", "triton", "cpp", "torch").
        start, stop: the fraction of the steps where SAG runs, `start <= step / steps < stop` (as
            sagfast's `sag_interval`).
        perturbed_guidance_scale: PAG's scale (diffusers' PerturbedAttentionGuidance name); 0 runs no
            perturbed pass.
        perturbed_guidance_layers: the self-attention layers PAG perturbs, as sagfast's `pag_layers`
            (identifiers searched in the layer names, as diffusers' `pag_applied_layers`: "mid",
            "down_blocks.1", "transformer_blocks.2"), not diffusers' guider's block indices.
        perturbed_guidance_start, perturbed_guidance_stop: PAG's fraction of the steps, counted as
            `start`/`stop` (sagfast's `pag_interval`; diffusers' PAG guider defaults to 0.01-0.2).
    """

    field_names = {
        "scale": "sag_scale",
        "layers": "sag_layers",
        "pag_scale": "perturbed_guidance_scale",
        "pag_layers": "perturbed_guidance_layers",
    }

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        sag_scale: float = 0.75,
        sag_layers: str = "mid",
        threshold: float = 1.0,
        blur_kernel_size: int = 9,
        blur_sigma: float = 1.0,
        mode: str = "exact",
        backend: str = "auto",
        start: float = 0.0,
        stop: float = 1.0,
        perturbed_guidance_scale: float = 0.0,
        perturbed_guidance_layers: str | list = "mid",
        perturbed_guidance_start: float = 0.0,
        perturbed_guidance_stop: float = 1.0,
        enabled: bool = True,
    ):
        # SAGConfig's checks (its registry's), under this guider's field names; a scale here is one
        # number (no per-image lists). Accepted numbers are stored as Python floats (in the config too,
        # which `save_pretrained` writes as JSON).
        problems = []

        def take(field, name, value):
            value, problem = FIELDS[field].check(name, value)
            if problem is not None:
                problems.append(problem)
            return value

        def number(name, value):
            value, problem = check_real(name, value, low=0.0)
            if problem is not None:
                problems.append(problem)
            return value

        fields = dict(
            guidance_scale=number("guidance_scale", guidance_scale),
            sag_scale=number("sag_scale", sag_scale),
            threshold=take("threshold", "threshold", threshold),
            blur_kernel_size=take("blur_kernel_size", "blur_kernel_size", blur_kernel_size),
            blur_sigma=take("blur_sigma", "blur_sigma", blur_sigma),
            perturbed_guidance_scale=number("perturbed_guidance_scale", perturbed_guidance_scale),
        )
        sag_layers = take("layers", "sag_layers", sag_layers)
        mode = take("mode", "mode", mode)
        backend = take("backend", "backend", backend)
        layers = take("pag_layers", "perturbed_guidance_layers", perturbed_guidance_layers)
        interval = take("sag_interval", "(start, stop)", (start, stop))
        pag_interval = take(
            "pag_interval", "(perturbed_guidance_start, perturbed_guidance_stop)", (perturbed_guidance_start, perturbed_guidance_stop)
        )
        if problems:
            raise ValueError("invalid SelfAttentionGuidance: " + "; ".join(problems))
        config = SAGConfig(
            cfg_scale=fields["guidance_scale"],
            scale=fields["sag_scale"],
            layers=sag_layers,
            threshold=fields["threshold"],
            blur_kernel_size=fields["blur_kernel_size"],
            blur_sigma=fields["blur_sigma"],
            mode=mode,
            backend=backend,
            sag_interval=interval,
            pag_scale=fields["perturbed_guidance_scale"],
            pag_layers=layers,
            pag_interval=pag_interval,
        )
        # BaseGuidance's start and stop are SAG's here (CFG runs on every step).
        self.setup(config, interval, enabled)
        (start, stop), (pag_start, pag_stop) = interval, pag_interval
        self.register_to_config(**fields, start=start, stop=stop, perturbed_guidance_start=pag_start, perturbed_guidance_stop=pag_stop)
        self.sag_scale = fields["sag_scale"]
        self.threshold = fields["threshold"]
        self.blur_kernel_size = fields["blur_kernel_size"]
        self.blur_sigma = fields["blur_sigma"]
        self.perturbed_guidance_scale = fields["perturbed_guidance_scale"]
        self.perturbed_guidance_layers = layers
        self.perturbed_guidance_start = pag_start
        self.perturbed_guidance_stop = pag_stop
        self.sag_layers = sag_layers
        self.mode = mode
        self.backend = backend


__all__ = ["Guidance", "SelfAttentionGuidance"]
