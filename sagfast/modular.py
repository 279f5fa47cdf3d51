"""diffusers' modular pipelines: every condition of a guider in one model call per step.

A modular pipeline's denoise loop runs its guider's conditions one after another, one model pass each:

    for batch in guider.prepare_inputs(...):
        guider.prepare_models(model); batch.noise_pred = model(...)[0]; guider.cleanup_models(model)
    noise_pred = guider(batches)

`batch_guidance(pipe)` keeps that loop as diffusers wrote it and defers its model calls: inside the
loop block the model is a recorder that keeps each call's inputs and returns a placeholder; when the
guider is called to combine the predictions, the recorded calls run as ONE model call on the rows
of all conditions joined (every batched input, text embeddings and added conditions included), and
each placeholder gets its rows of the output. The guider's own `prepare_models` / `cleanup_models`
still run for every condition, in order, so its counters and state are as unbatched: what a
condition's `prepare_models` installs on the model (diffusers' layer-skip hooks for PAG and
SkipLayer, SmoothedEnergy's query hook) is read off the model for that condition and applied in the
joined call to that condition's rows only, by the module's hooked forward on those rows (diffusers'
hooks act on a whole batch). So a result equals the unbatched loop's, whatever the guider does.

`unbatch_guidance(pipe)` restores the loop blocks. A loop that uses a model output before the guider
combines them cannot be batched: the placeholder raises, naming the block.
"""

from __future__ import annotations

import functools

import torch

from sagfast.core.batch import slice_batch

DENOISER_NAMES = ("unet", "transformer")
"""The component names of the model whose calls are joined."""


def _loop_denoisers(blocks):
    """The blocks of `blocks`' tree that call the denoiser once per guider condition: the sub-blocks
    of loop wrappers that expect a guider."""
    from diffusers.modular_pipelines.modular_pipeline import LoopSequentialPipelineBlocks

    found, stack = [], [blocks]
    while stack:
        block = stack.pop()
        children = getattr(block, "sub_blocks", None) or {}
        for child in children.values():
            names = {spec.name for spec in getattr(child, "expected_components", [])}
            if isinstance(block, LoopSequentialPipelineBlocks) and "guider" in names and names & set(DENOISER_NAMES):
                found.append(child)
            stack.append(child)
    return found


def _running_blocks(pipe, caller: str):
    """The blocks `pipe` runs (diffusers' `ModularPipeline.blocks` returns a deep copy of them)."""
    from diffusers.modular_pipelines import ModularPipeline

    if not isinstance(pipe, ModularPipeline):
        raise ValueError(
            f"sagfast.modular.{caller} takes a diffusers modular pipeline (a ModularPipeline, such as "
            f"StableDiffusionXLAutoBlocks().init_pipeline() or ModularPipeline.from_pretrained(...)), got "
            f"{type(pipe).__name__}; a standard pipeline is guided by sagfast.enable(pipe, ...)"
        )
    return pipe._blocks


def batch_guidance(pipe):
    """Run every guider condition of `pipe`'s denoise steps in one model call per step. Returns `pipe`."""
    blocks = _loop_denoisers(_running_blocks(pipe, "batch_guidance"))
    if not blocks:
        raise ValueError(
            f"{type(pipe).__name__} has no denoise loop block that calls its model once per guider condition "
            "(a sub-block of a loop wrapper expecting a guider and a unet or transformer): nothing to batch"
        )
    for block in blocks:
        if not isinstance(block, BatchedConditions):
            block.__class__ = _batched_class(type(block))
    return pipe


def unbatch_guidance(pipe):
    """Give `pipe`'s denoise loop blocks back their own classes. Returns `pipe`."""
    for block in _loop_denoisers(_running_blocks(pipe, "unbatch_guidance")):
        if isinstance(block, BatchedConditions):
            block.__class__ = block.sagfast_base
    return pipe


class BatchedConditions:
    """What a batched loop block's class adds to its own: `__call__` runs the block with the model's
    calls deferred and joined (see the module docstring)."""

    sagfast_base: type

    def __call__(self, components, block_state, *args, **kwargs):
        view = DeferredComponents(components, type(self).__name__)
        _, block_state = self.sagfast_base.__call__(self, view, block_state, *args, **kwargs)
        view.check_resolved()
        return components, block_state


@functools.cache
def _batched_class(base: type) -> type:
    return type(base.__name__, (BatchedConditions, base), {"sagfast_base": base, "__module__": base.__module__})


class Pending:
    """A deferred model output: resolved when the guider combines the conditions."""

    def __init__(self, block: str):
        self.block = block

    def _refuse(self, *args, **kwargs):
        raise TypeError(
            f"sagfast.modular.batch_guidance: the loop block {self.block} used a model output before its guider "
            "combined the conditions, so its model calls cannot be joined; call unbatch_guidance(pipe)"
        )

    __getattr__ = __add__ = __mul__ = __sub__ = __truediv__ = __getitem__ = _refuse


class DeferredComponents:
    """The pipeline's components as the loop block sees them while batched: the denoiser records its
    calls, the guider joins them when it combines; everything else is the pipeline's."""

    def __init__(self, components, block: str):
        self.__dict__.update(components=components, block=block, calls=[], guider_view=None, models={})

    def __getattr__(self, name):
        value = getattr(self.components, name)
        if name == "guider":
            if self.guider_view is None:
                self.__dict__["guider_view"] = JoiningGuider(value, self)
            return self.guider_view
        if name in DENOISER_NAMES and isinstance(value, torch.nn.Module):
            if name not in self.models:
                self.models[name] = RecordingModel(value, self)
            return self.models[name]
        return value

    def check_resolved(self) -> None:
        if self.calls:
            raise RuntimeError(
                f"sagfast.modular.batch_guidance: the loop block {self.block} made model calls its guider never "
                "combined; call unbatch_guidance(pipe)"
            )


def _hooks(model) -> dict:
    """module -> the names of the diffusers hooks registered on it now (diffusers keeps a module's hook
    registry in its `_diffusers_hook` attribute)."""
    out = {}
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.hooks:
            out[module] = tuple(registry.hooks)
    return out


class RecordingModel:
    """The denoiser inside a batched loop block: a call records its inputs and what the guider's
    `prepare_models` installed for it (the modules whose hooks differ from the step's start, with their
    hooked forwards), and returns a placeholder."""

    def __init__(self, model, view: DeferredComponents):
        self.model = model
        self.view = view
        self.baseline = _hooks(model)
        self.pre_hooks = set(model._forward_pre_hooks)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        args, kwargs = self._own_inputs(args, kwargs)
        now = _hooks(self.model)
        perturbed = [(module, module.forward) for module, names in now.items() if names != self.baseline.get(module)]
        pending = Pending(self.view.block)
        self.view.calls.append((args, kwargs, perturbed, pending))
        return (pending,)

    def _own_inputs(self, args, kwargs):
        """The call's inputs through the forward pre-hooks a condition's `prepare_models` put on the model
        itself (sagfast's SAG guider replaces the degraded condition's latent so): they act on this
        condition's inputs, and are gone (cleaned up) when the joined call runs."""
        with_kwargs = self.model._forward_pre_hooks_with_kwargs
        for key, hook in list(self.model._forward_pre_hooks.items()):
            if key in self.pre_hooks:
                continue
            if key in with_kwargs:
                result = hook(self.model, args, kwargs)
                if result is not None:
                    args, kwargs = result
            else:
                result = hook(self.model, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
        return args, kwargs


class JoiningGuider:
    """The guider inside a batched loop block: itself, except that combining the conditions first runs
    their recorded model calls as one."""

    def __init__(self, guider, view: DeferredComponents):
        self.guider = guider
        self.view = view
        self.batches = []

    def __getattr__(self, name):
        return getattr(self.guider, name)

    def prepare_inputs(self, *args, **kwargs):
        self.batches = self.guider.prepare_inputs(*args, **kwargs)
        return self.batches

    def prepare_inputs_from_block_state(self, *args, **kwargs):
        self.batches = self.guider.prepare_inputs_from_block_state(*args, **kwargs)
        return self.batches

    def prepare_models(self, denoiser):
        # A condition whose inputs are built from the earlier ones' predictions (SAG's exact degraded
        # pass) needs them now: the calls deferred so far run first, as one.
        needs = getattr(self.guider, "needs_predictions", None)
        if needs is not None and needs():
            self.run_deferred(self.batches)
        return self.guider.prepare_models(denoiser.model if isinstance(denoiser, RecordingModel) else denoiser)

    def cleanup_models(self, denoiser):
        return self.guider.cleanup_models(denoiser.model if isinstance(denoiser, RecordingModel) else denoiser)

    def run_deferred(self, guider_state) -> None:
        """Run the recorded calls as one and hand each condition of `guider_state` its rows."""
        calls, self.view.__dict__["calls"] = self.view.calls, []
        if calls:
            outputs = run_joined(next(iter(self.view.models.values())).model, calls)
            for batch in guider_state:
                for (_, _, _, pending), out in zip(calls, outputs):
                    if getattr(batch, "noise_pred", None) is pending:
                        batch.noise_pred = out

    def __call__(self, guider_state):
        self.run_deferred(guider_state)
        return self.guider(guider_state)


def run_joined(model, calls: list) -> list:
    """The outputs ([rows of one call]) of the recorded calls, run as one model call."""
    first_args, first_kwargs = calls[0][0], calls[0][1]
    b = first_args[0].shape[0] if first_args else next(iter(first_kwargs.values())).shape[0]
    n = len(calls)
    joined_args = _joined([c[0] for c in calls], b)
    joined_kwargs = _joined([c[1] for c in calls], b)
    handles = []
    for j, (_, _, perturbed, _) in enumerate(calls):
        rows = slice(j * b, (j + 1) * b)
        for module, forward in perturbed:
            handles.append(module.register_forward_hook(_rows_through(forward, rows, n * b), with_kwargs=True))
    try:
        out = model(*joined_args, **joined_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    first = out[0] if isinstance(out, (tuple, list)) else out.sample
    return [first[j * b : (j + 1) * b] for j in range(n)]


def _joined(structures: list, b: int):
    """Join the calls' arguments (same structure in every call) along the batch dim `b`."""
    first = structures[0]
    if torch.is_tensor(first):
        if first.dim() >= 1 and first.shape[0] == b:
            return torch.cat(structures)
        for other in structures[1:]:
            if other is not first and not (torch.is_tensor(other) and other.shape == first.shape and torch.equal(other, first)):
                raise ValueError("sagfast.modular.batch_guidance: the conditions differ in an input that has no batch dim")
        return first
    if isinstance(first, dict):
        return {k: _joined([s[k] for s in structures], b) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_joined([s[i] for s in structures], b) for i in range(len(first)))
    return first


def _rows_through(forward, rows: slice, full: int):
    """A forward hook that replaces the output's rows `rows` with `forward` (the module's forward as a
    condition's `prepare_models` left it) on those rows of the input; calls whose batch is not the
    joined call's (`full` rows) are left alone."""

    def hook(module, args, kwargs, output):
        lead = output[0] if isinstance(output, (tuple, list)) else output
        if not torch.is_tensor(lead) or lead.shape[0] != full:
            return output
        part_args, part_kwargs = slice_batch((args, kwargs), full, rows)
        part = forward(*part_args, **part_kwargs)
        if isinstance(output, (tuple, list)):
            return type(output)(_put(o, p, rows) for o, p in zip(output, part))
        return _put(output, part, rows)

    return hook


def _put(whole, part, rows: slice):
    if not torch.is_tensor(whole):
        return whole
    whole = whole.clone()
    whole[rows] = part
    return whole


__all__ = ["batch_guidance", "unbatch_guidance"]
