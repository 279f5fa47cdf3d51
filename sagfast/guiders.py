"""Self-Attention Guidance as a diffusers guider, for diffusers' modular pipelines.

    pipe.update_components(guider=SelfAttentionGuidance(guidance_scale=5.0, sag_scale=0.75))

A modular pipeline's denoise loop runs a guider's conditions one model pass each (`prepare_inputs`,
then per condition `prepare_models`, the model, `cleanup_models`, then the guider's call). This
guider's conditions are the conditional branch, the unconditional one (with CFG) and SAG's degraded
pass, which takes the guide branch's inputs (uncond under CFG, else cond):

- the guide condition's `prepare_models` puts a diffusers hook on the capture layer (sagfast's
  families name it: "mid" is the UNet's first mid-block self-attention, a transformer's middle block)
  that runs the layer through sagfast's capture processor, which records the attention mass and the
  mask `mass > threshold` on the layer's map (never the N x N map);
- the degraded condition's `prepare_models` puts a forward pre-hook on the denoiser that replaces its
  latent input by the degraded input: the guide prediction's x0 blurred under the mask and re-noised
  to the step's noise level (`sagfast.ops.degrade`), or in batched mode the previous step's eps and
  mask applied to this step's input;
- with `perturbed_guidance_scale > 0` (PAG), the perturbed condition (the cond inputs again) puts a
  diffusers hook on each PAG layer that runs sagfast's identity attention (each query attends to
  its own key only);
- the call combines `cfg + sag_scale * (o_guide - o_degraded) + perturbed_guidance_scale * (o_cond -
  o_perturbed)`.

The conditions run in the order cond, uncond (with CFG), perturbed (with PAG), degraded (with SAG).

A guider is handed the denoiser and the timestep, never the scheduler, and the degraded input needs
the step's noise level: the guider reads it at each step from the `scheduler` of the modular pipeline
that is running it (`running_pipeline`; any scheduler sagfast accepts, any betas). Driven outside a
modular pipeline, `bind(pipe)` names the pipeline whose scheduler it reads.

Whatever it puts on a model comes off when a call fails: the step's layers and scheduler are checked
before anything is installed, an exception in its hooks or in the model's pass takes everything off
before it propagates (diffusers' loop calls no `cleanup_models` then), and hooks an interrupt left
between passes do nothing and are taken off by the model's next pass.

With `sagfast.modular.batch_guidance(pipe)` the conditions share model calls: in batched mode one per
step after the first; in exact mode the degraded pass is a second call (it needs this step's guide
prediction).
"""

from __future__ import annotations

import inspect

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput
from diffusers.hooks import HookRegistry, ModelHook

from sagfast.attention.capture import input_grid, over_patch
from sagfast.config import BACKENDS, MODES
from sagfast.core.schedule import check_scheduler, noise_of, prediction_of, x0_eps
from sagfast.core.settings import check_choice, check_interval, check_layer, check_layers, check_odd_int, check_real
from sagfast.families import family_of_model
from sagfast.ops.degrade import check_blur_size
from sagfast.ops.mask import to_map
from sagfast.terms.sag import Previous, degraded_from_previous, degraded_input, predicted_channels

CAPTURE_HOOK = "sagfast_sag_capture"
PERTURB_HOOK = "sagfast_pag_identity"


def model_call(family, args: tuple, kwargs: dict) -> dict:
    """A denoiser call's inputs by name: the latent under the family's `sample_argument` (the SDXL loop
    passes it by position), the rest as passed."""
    return {family.sample_argument: args[0], **kwargs} if args else dict(kwargs)


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
    """A diffusers hook that runs a layer through `forward(module, hidden_states, ...)` instead of its own
    forward: the capture processor on the guide condition's capture layer, the identity attention on
    each PAG layer for the perturbed condition. While `live()` is false (a hook a failed call left on
    the model) it runs the layer's own forward."""

    def __init__(self, forward, live):
        super().__init__()
        self.forward = forward
        self.live = live

    def new_forward(self, module, *args, **kwargs):
        if self.live():
            return self.forward(module, *args, **kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)


class SelfAttentionGuidance(BaseGuidance):
    """Classifier-free guidance plus SAG (Hong et al., ICCV 2023), and optionally PAG (Ahn et al. 2024),
    as a diffusers guider: `cfg + sag_scale * (o_guide - o_degraded) + perturbed_guidance_scale *
    (o_cond - o_perturbed)`.

    Args:
        guidance_scale: CFG scale; at or below 1 there is no unconditional pass and SAG guides the
            conditional branch.
        sag_scale: SAG scale s in `cfg + s * (o_guide - o_degraded)`; 0 runs no degraded pass.
        sag_layers: the capture layer, as sagfast's `layers`: "mid" or a module name.
        threshold: the mask is `attention mass > threshold` (mass averaged over heads; 1 is the mean).
        blur_kernel_size, blur_sigma: the Gaussian blur of the predicted x0 under the mask.
        mode: "exact" (the degraded pass from this step's guide prediction: two model calls per step when
            batched) or "batched" (from the previous step's eps and mask: one call when batched; the
            first step is exact).
        backend: the ops' backend ("auto", "triton", "cpp", "torch").
        start, stop: the fraction of the steps where SAG runs, `start <= step / steps < stop` (as
            sagfast's `sag_interval`); CFG runs on every step.
        perturbed_guidance_scale: PAG's scale (diffusers' PerturbedAttentionGuidance name); 0 runs no
            perturbed pass.
        perturbed_guidance_layers: the self-attention layers PAG perturbs, as sagfast's `pag_layers`
            (identifiers searched in the layer names, as diffusers' `pag_applied_layers`: "mid",
            "down_blocks.1", "transformer_blocks.2"), not diffusers' guider's block indices.
        perturbed_guidance_start, perturbed_guidance_stop: PAG's fraction of the steps, counted as
            `start`/`stop` (sagfast's `pag_interval`; diffusers' PAG guider defaults to 0.01-0.2).
    """

    _input_predictions = ["pred_cond", "pred_uncond", "pred_perturbed", "pred_sag"]

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
        # The same checks as SAGConfig's fields (sagfast.config), under this guider's field names, so that
        # a setting means the same here and in `sagfast.enable`; accepted numbers are stored as Python
        # floats (in the config too, which `save_pretrained` writes as JSON).
        problems = []

        def take(checked):
            value, problem = checked
            if problem is not None:
                problems.append(problem)
            return value

        fields = dict(
            guidance_scale=take(check_real("guidance_scale", guidance_scale, low=0.0)),
            sag_scale=take(check_real("sag_scale", sag_scale, low=0.0)),
            threshold=take(check_real("threshold", threshold)),
            blur_kernel_size=take(check_odd_int("blur_kernel_size", blur_kernel_size)),
            blur_sigma=take(check_real("blur_sigma", blur_sigma, low=0.0, low_ok=False)),
            perturbed_guidance_scale=take(check_real("perturbed_guidance_scale", perturbed_guidance_scale, low=0.0)),
        )
        sag_layers = take(check_layer("sag_layers", sag_layers))
        mode = take(check_choice("mode", mode, MODES))
        backend = take(check_choice("backend", backend, BACKENDS))
        layers = take(check_layers("perturbed_guidance_layers", perturbed_guidance_layers))
        interval = take(check_interval("(start, stop)", (start, stop)))
        pag_interval = take(
            check_interval("(perturbed_guidance_start, perturbed_guidance_stop)", (perturbed_guidance_start, perturbed_guidance_stop))
        )
        if problems:
            raise ValueError("invalid SelfAttentionGuidance: " + "; ".join(problems))
        (start, stop), (pag_start, pag_stop) = interval, pag_interval
        super().__init__(start, stop, enabled)
        self.register_to_config(**fields, start=start, stop=stop, perturbed_guidance_start=pag_start, perturbed_guidance_stop=pag_stop)
        self.guidance_scale = fields["guidance_scale"]
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
        self.pipe = None
        self._batches = []
        self._mask = None
        self._hw = None
        self._handles = []
        self._hooks = []
        """(registry, name) of the diffusers hooks this condition's pass put on."""
        self._step_handles = []
        """Hooks kept to the guider's call: the map-size recorder must see the guide rows' pass, which
        `batch_guidance` runs after the condition's cleanup, when it joins the calls; the pass watch."""
        self._token = object()
        """What the installed hooks belong to: replaced when they are all taken off, so that a hook still
        running (torch runs a module's pre-hooks from a copy of its list) or left behind does nothing."""
        self._epoch = 0
        """Counts `prepare_models` and `cleanup_models` calls: every model pass of a condition follows one."""
        self._pass_epoch = self._watched = None
        """The epoch at which the watched denoiser's last pass began; that denoiser."""
        self._capture = self._perturbed = None
        """This step's capture layer (family.resolve_layer) and PAG layers, checked before any hook goes on."""
        self._previous = None
        """Batched mode: (step, CFG on, Previous) of the last step that recorded its guide eps and mask."""
        self._x = self._call = self._family = None
        """The guide pass's latent (as an image), its call's inputs, the denoiser's family."""

    def bind(self, pipe) -> SelfAttentionGuidance:
        """Read the noise level from `pipe.scheduler` at every step (a pipeline, or anything with a
        `scheduler`) where no modular pipeline holding the guider runs it (a loop of your own): in
        one, its own scheduler is read. Returns the guider."""
        if getattr(pipe, "scheduler", None) is None:
            raise ValueError(
                f"SelfAttentionGuidance.bind takes the pipeline whose scheduler it reads the noise level from; "
                f"this {type(pipe).__name__} has no `scheduler`"
            )
        self.pipe = pipe
        return self

    # -- which conditions run -------------------------------------------------------------------------

    def _is_cfg_enabled(self) -> bool:
        return self._enabled and self.guidance_scale > 1.0

    def _is_sag_enabled(self) -> bool:
        if not self._enabled or self.sag_scale == 0 or self._num_inference_steps is None:
            return False
        return self._start <= self._step / self._num_inference_steps < self._stop

    def _is_pag_enabled(self) -> bool:
        if not self._enabled or self.perturbed_guidance_scale == 0 or self._num_inference_steps is None:
            return False
        return self.perturbed_guidance_start <= self._step / self._num_inference_steps < self.perturbed_guidance_stop

    def _records(self) -> bool:
        """Whether this step's guide pass records eps and mask: a SAG step, or in batched mode a step
        before the interval's end (so that the first SAG step can already be batched)."""
        if self._is_sag_enabled():
            return True
        return self.mode == "batched" and self._enabled and self.sag_scale != 0 and self._step / self._num_inference_steps < self._stop

    @property
    def num_conditions(self) -> int:
        return 1 + self._is_cfg_enabled() + self._is_pag_enabled() + self._is_sag_enabled()

    @property
    def is_conditional(self) -> bool:
        """Whether the condition prepared last takes the conditional inputs (read by the SDXL loop's
        ControlNet guess mode)."""
        return self._conditions()[self._count_prepared - 1][0] == 0

    @property
    def _guide_index(self) -> int:
        return 1 if self._is_cfg_enabled() else 0

    def _from_previous(self) -> bool:
        previous = self._previous
        return self.mode == "batched" and previous is not None and previous[0] == self._step - 1 and previous[1] == self._is_cfg_enabled()

    def needs_predictions(self) -> bool:
        """Whether the condition prepared next takes the earlier conditions' predictions as input (the
        degraded pass in exact mode or on batched mode's first step): `batch_guidance` then runs the
        calls it has deferred before preparing it."""
        return self._is_sag_enabled() and self._count_prepared == len(self._batches) - 1 and not self._from_previous()

    def set_state(self, step: int, num_inference_steps: int, timestep) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if step == 0:
            self._previous = None
        self._mask = self._x = self._hw = None
        self._remove_all()  # what a failed call of this guider left on a model

    def _conditions(self) -> list:
        """(tuple index of the inputs, prediction name) per condition: cond, uncond with CFG, PAG's
        perturbed pass on the cond inputs, and SAG's degraded pass on the guide branch's inputs (last:
        its input is built from the others' predictions)."""
        conditions = [(0, "pred_cond"), (1, "pred_uncond")][: 1 + self._is_cfg_enabled()]
        if self._is_pag_enabled():
            conditions.append((0, "pred_perturbed"))
        if self._is_sag_enabled():
            conditions.append((self._guide_index, "pred_sag"))
        return conditions

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
            if index == self._guide_index and self._records():
                self._arm_capture(denoiser)
            elif self._is_sag_enabled() and index == len(self._batches) - 1:
                self._degrade_input(denoiser)
            elif self._conditions()[index][1] == "pred_perturbed":
                for layer in self._perturbed:
                    self._hook(denoiser, layer, self._family.perturbed_attention, PERTURB_HOOK)
        except BaseException:
            self._remove_all()
            raise

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        self._epoch += 1
        for registry, name in self._hooks:
            registry.remove_hook(name, recurse=False)
        self._hooks = []
        self._remove(self._handles)

    def _check_step(self, denoiser) -> None:
        """Resolve and check everything this step's conditions need (capture layer, PAG layers, scheduler)
        before the first of them installs anything."""
        family = self._family = family_of_model(denoiser)
        self._capture = self._perturbed = None
        if self._records():
            self._capture = family.resolve_layer(denoiser, self.sag_layers)
            check_scheduler(self._scheduler())
        if self._is_pag_enabled():
            self._perturbed = family.matching_layers(denoiser, self.perturbed_guidance_layers, "perturbed_guidance_layers")

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
                "SelfAttentionGuidance needs the pipeline's scheduler for the noise level of its degraded pass. "
                "It reads it from the modular pipeline it is a component of while that pipeline runs it; run "
                "outside one, it is only handed the model: set it with `guider.bind(pipe)` (anything with a `scheduler`)"
            )
        return pipe.scheduler

    def _arm_capture(self, denoiser) -> None:
        family = self._family
        name, attn, owner, patch = self._capture
        backend, threshold = self.backend, self.threshold

        def capture(module, hidden_states, *args, **kwargs):
            processor = family.capture_processor(slice(None), backend, False, threshold)
            out = processor(module, hidden_states, *args, **kwargs)
            self._mask = processor.mask
            return out

        def record_hw(module, args, kwargs):
            if self._hw is None:
                grid = input_grid(args[0] if args else kwargs[family.sample_argument if module is denoiser else "hidden_states"], patch)
                self._hw = over_patch(grid, patch) if grid is not None else None

        def record_x(module, args, kwargs):
            self._call = model_call(family, args, kwargs)
            self._x = family.to_image(self._call[family.sample_argument], self._call)
            self._hw = family.map_size(self._call) or self._hw  # a packed model's call names its grid

        self._hook(denoiser, attn, capture, CAPTURE_HOOK)
        self._step_handles.append(owner.register_forward_pre_hook(self._guarded(record_hw), with_kwargs=True))
        self._handles.append(denoiser.register_forward_pre_hook(self._guarded(record_x), with_kwargs=True))

    def _noise(self, x):
        return noise_of(self._scheduler(), self._timestep, x.shape[0], x.device)

    def _degrade_input(self, denoiser) -> None:
        self._watch(denoiser)
        family = self._family
        argument = family.sample_argument
        guide = self._batches[self._guide_index]

        def replace(module, args, kwargs):
            call = model_call(family, args, kwargs)
            x = family.to_image(call[argument], call)  # [B, C, H, W], or [B, C, T, H, W] for video
            check_blur_size(x.shape[-2], x.shape[-1], self.blur_kernel_size)
            noise = self._noise(x)
            if self._from_previous():
                previous = self._previous[2]
                xd = degraded_from_previous(
                    x[:, : previous.eps.shape[1]], previous, noise, self.blur_kernel_size, self.blur_sigma, self.backend
                )
            else:
                o = family.to_image(guide.noise_pred, call)
                c = predicted_channels(o, x)
                x0, eps = x0_eps(x[:, :c], o[:, :c], noise, prediction_of(self._scheduler()))
                xd = degraded_input(x0, self._map_mask(), eps, noise, self.blur_kernel_size, self.blur_sigma, self.backend)
            xd = family.to_model_input(torch.cat([xd.to(x.dtype), x[:, xd.shape[1] :]], dim=1), call)
            if args:
                return (xd, *args[1:]), kwargs
            return args, {**kwargs, argument: xd}

        self._handles.append(denoiser.register_forward_pre_hook(self._guarded(replace), with_kwargs=True))

    def _map_mask(self) -> torch.Tensor:
        if self._mask is None or self._hw is None:
            raise RuntimeError(f"SAG's capture layer {self.sag_layers!r} did not run in the guide condition's model pass")
        return to_map(self._mask, self._hw)

    # -- the combine ---------------------------------------------------------------------------------

    def forward(
        self,
        pred_cond: torch.Tensor,
        pred_uncond: torch.Tensor | None = None,
        pred_perturbed: torch.Tensor | None = None,
        pred_sag: torch.Tensor | None = None,
    ):
        self._remove_all()
        pred = pred_cond if pred_uncond is None else pred_uncond + self.guidance_scale * (pred_cond - pred_uncond)
        guide = pred_cond if pred_uncond is None else pred_uncond
        if pred_sag is not None:
            pred = pred + self.sag_scale * (guide - pred_sag)
        if pred_perturbed is not None:
            pred = pred + self.perturbed_guidance_scale * (pred_cond - pred_perturbed)
        if self.mode == "batched" and self._records() and self._x is not None:
            x, o = self._x, self._family.to_image(guide, self._call)
            c = predicted_channels(o, x)
            _, eps = x0_eps(x[:, :c], o[:, :c], self._noise(x), prediction_of(self._scheduler()))
            self._previous = (self._step, self._is_cfg_enabled(), Previous(eps, self._map_mask()))
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


__all__ = ["SelfAttentionGuidance"]
