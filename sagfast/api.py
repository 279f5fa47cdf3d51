"""Turning SAG on and off on a diffusers pipeline: one lifecycle for `enable`, `guided` and the drop-in.

`enable(pipe)` keeps `pipe.unet` the user's own model object. It checks everything first, then:

1. installs the capture on the model once (a dormant processor switch on the capture layer and on
   the layers the config's terms change, PAG's and SEG's, and a map hook, sagfast.attention.capture),
2. stores the SAGConfig in the pipeline (`pipe.__dict__`, plain data: it copies and pickles), and
3. gives the pipeline a subclass of its own class, with the same name, whose `__call__` runs the call
   as a `GuidedCall` (sagfast.engine.denoiser) and whose denoiser attribute (`unet`) is the call's guided
   denoiser while that call runs in this thread, and the user's model at any other time.

So saving, `state_dict`, `components`, `from_pipe`, copying and pickling see the user's model; a call
knows its own pipeline, scheduler and CFG state through a per-thread slot, never through a
reference another pipeline, thread or copy could share. `disable` puts the class back, drops the
config and, when no other enabled pipeline uses the model, takes the capture off it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import threading
import weakref

from sagfast.attention import capture
from sagfast.config import TERMS, SAGConfig
from sagfast.engine.cuda_graph import drop_graphs_of
from sagfast.engine.denoiser import GuidedCall
from sagfast.families import family_of, family_of_class
from sagfast.terms.sag import SAG

CONFIG_KEY = "_sagfast_config"
"""Where an enabled pipeline keeps its SAGConfig (in its `__dict__`)."""

ACTIVE_CALL = capture.ThreadSlot()
"""The GuidedCall running in this thread, or None."""

# Who uses a model's capture: the pipelines enabled now, and the guided calls running (a drop-in
# pipeline is not enabled: its calls install the capture and the last one running takes it off).
_ENABLED = weakref.WeakSet()
_RUNNING: dict = {}  # id(model) -> guided calls running on it
_LOCK = threading.RLock()


def make_config(config: SAGConfig | None, overrides: dict) -> SAGConfig:
    if config is not None and not isinstance(config, SAGConfig):
        raise TypeError(f"config must be a sagfast.SAGConfig or None; got {type(config).__name__}")
    fields = {f.name for f in dataclasses.fields(SAGConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown SAGConfig field(s) {unknown}; accepted: {sorted(fields)}")
    return dataclasses.replace(config or SAGConfig(), **overrides)


def call_arguments(function, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call of the pipeline's `__call__`, its defaults included."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.update(arguments.pop("kwargs", None) or {})
    return arguments


@contextlib.contextmanager
def guided_call(pipe, config: SAGConfig, arguments: dict | None = None):
    """The body runs one guided call of `pipe` (a pipeline with a GuidedPipelineMixin class);
    `arguments` are the pipeline call's (sagfast reads `generator` and, for pipelines without a
    `do_classifier_free_guidance` property, `guidance_scale`). A pipeline with two denoisers (Wan 2.2's
    `transformer_2`) gets a guided call for each, which share the pipeline's CFG state."""
    family = family_of(pipe)
    calls = [GuidedCall(pipe, config, family, arguments or {}, attribute) for attribute in denoisers(pipe)]
    for call in calls[1:]:
        calls[0].join(call)
    models = [call.model for call in calls]
    with _LOCK:
        for call in calls:
            # Again at each call: a processor set since `enable` (set_attn_processor) is wrapped anew.
            call.capture.reinstall()
        for model in models:
            _RUNNING[id(model)] = _RUNNING.get(id(model), 0) + 1
    call_token = ACTIVE_CALL.set(calls[0])
    try:
        yield calls[0]
    finally:
        ACTIVE_CALL.reset(call_token)
        with _LOCK:
            for model in models:
                _RUNNING[id(model)] -= 1
                if not _RUNNING[id(model)]:
                    del _RUNNING[id(model)]
                _release(model)


def denoisers(pipe) -> list[str]:
    """The attributes of `pipe` that hold a denoiser sagfast guides (Wan 2.2: "transformer" and, when
    set, "transformer_2")."""
    return [a for a in family_of_class(type(pipe)).attributes if pipe.__dict__.get(a) is not None]


def _release(model) -> None:
    """Take the capture off `model` when no enabled pipeline and no running call uses it (under _LOCK)."""
    if model is None or id(model) in _RUNNING or any(model is m for p in list(_ENABLED) for m in _models(p)):
        return
    capture.uninstall(getattr(model, "_orig_mod", model))


def denoiser_property(attribute: str) -> property:
    """The pipeline attribute `attribute` ("unet"): the running guided call's denoiser inside a call of
    this pipeline, the stored model otherwise. Setting it stores the model, as a plain attribute would."""

    def get(self):
        call = ACTIVE_CALL.get()
        if call is not None and call.pipe is self and attribute in call.siblings:
            return call.denoiser_of(attribute)
        return self.__dict__[attribute]

    def set(self, value):
        with _LOCK:
            before = self.__dict__.get(attribute)
            self.__dict__[attribute] = value
            if hasattr(before, "modules") and before is not value:
                _release(before)  # a model this pipeline no longer holds keeps no capture of sagfast's

    return property(get, set, doc=f"The pipeline's {attribute} (its guided stand-in during a guided call).")


class GuidedPipelineMixin:
    """What an enabled pipeline's class adds to the pipeline class it was (see the module docstring)."""

    def __call__(self, *args, **kwargs):
        config = self.__dict__.get(CONFIG_KEY)
        if config is None:
            return super().__call__(*args, **kwargs)
        with guided_call(self, config, call_arguments(super().__call__, args, kwargs)):
            return super().__call__(*args, **kwargs)

    @property
    def components(self) -> dict:
        # Inside a call too (diffusers' offload hooks are put back at the end of every call): the models.
        components = super().components
        for attribute in family_of_class(type(self)).attributes:
            if attribute in components:
                components[attribute] = self.__dict__[attribute]
        return components


def _reduce_guided(self, protocol):
    # Copies and pickles of an enabled pipeline: the guided class is made at run time and cannot be
    # found by name, so they are rebuilt from the base class and registered as enabled on arrival.
    return (rebuild_guided, (self.sagfast_base,), self.__dict__.copy())


_GUIDED_CLASSES: dict = {}


def _guided_call_method(base: type):
    """GuidedPipelineMixin's `__call__` under the name, signature and docstring of `base.__call__`, so
    that `help(pipe)`, IDEs and `inspect.signature` see the pipeline's own arguments."""

    @functools.wraps(base.__call__)
    def __call__(self, *args, **kwargs):
        return GuidedPipelineMixin.__call__(self, *args, **kwargs)

    return __call__


def guided_class(base: type) -> type:
    """The guided subclass of the pipeline class `base` (one per base class, same name and module, so
    `save_pretrained` records the base class)."""
    with _LOCK:
        cls = _GUIDED_CLASSES.get(base)
        if cls is None:
            namespace = {
                "sagfast_base": base,
                "__call__": _guided_call_method(base),
                **{attribute: denoiser_property(attribute) for attribute in family_of_class(base).attributes},
                "__reduce_ex__": _reduce_guided,
                "__module__": base.__module__,
                "__qualname__": base.__qualname__,
            }
            cls = _GUIDED_CLASSES[base] = type(base.__name__, (GuidedPipelineMixin, base), namespace)
        return cls


def rebuild_guided(base: type):
    """Unpickling / copying an enabled pipeline: an instance of its guided class, registered as enabled
    (pickle then restores its `__dict__`, the config included)."""
    pipe = object.__new__(guided_class(base))
    _ENABLED.add(pipe)
    return pipe


def _models(pipe) -> list:
    return [pipe.__dict__[a] for a in denoisers(pipe)]


def enable(pipe, config: SAGConfig | None = None, **overrides):
    """Apply SAG at every step of `pipe`'s calls. Returns `pipe`.

    `overrides` are SAGConfig fields (`sagfast.enable(pipe, scale=0.5)`). Enabling an enabled pipeline
    replaces its config. Everything is checked before the pipeline is touched.
    """
    config = make_config(config, overrides)
    family = family_of(pipe)
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise ValueError(f"{type(pipe).__name__} has no scheduler")
    family.check_scheduler(scheduler)
    installs = []
    for attribute in denoisers(pipe):
        model = getattr(pipe, attribute)
        _, attn, owner, _ = family.resolve_layer(model, SAG.capture_of(config)[0])
        requested = [term for term in TERMS if term.requested(config)]
        for term in requested:
            term.check_family(family)
        ruled = [layer for term in requested for layer in term.layers_of(family, model, config)]
        installs.append((attn, owner, ruled))
    with _LOCK:
        for attn, owner, ruled in installs:
            capture.install(attn, owner, ruled)
        pipe.__dict__[CONFIG_KEY] = config
        if not isinstance(pipe, GuidedPipelineMixin):
            pipe.__class__ = guided_class(type(pipe))
        _ENABLED.add(pipe)
    return pipe


def disable(pipe):
    """Turn SAG off: the pipeline's class and attributes are as before `enable`; the model's processors
    too, unless another enabled pipeline shares the model. Returns `pipe`."""
    if CONFIG_KEY not in pipe.__dict__:
        return pipe
    with _LOCK:
        models = _models(pipe)
        del pipe.__dict__[CONFIG_KEY]
        base = getattr(type(pipe), "sagfast_base", None)
        if base is not None:
            pipe.__class__ = base
        _ENABLED.discard(pipe)
        for model in models:
            _release(model)
    return pipe


def is_enabled(pipe) -> bool:
    return CONFIG_KEY in pipe.__dict__


def config_of(pipe) -> SAGConfig | None:
    """The SAGConfig `pipe` is enabled with, or None."""
    return pipe.__dict__.get(CONFIG_KEY)


def drop_graphs(pipe) -> None:
    """Forget the CUDA graphs captured on `pipe`'s model, freeing their memory; the next step captures
    afresh. Needed after a change to the model that the graphs cannot see (adapter weights set with
    `set_adapters`, an attribute a layer reads); moved or cast weights, a LoRA loaded and swapped
    processors are seen."""
    for model in _models(pipe):
        drop_graphs_of(model)


@contextlib.contextmanager
def guided(pipe, config: SAGConfig | None = None, **overrides):
    """`with sagfast.guided(pipe, scale=0.5): pipe(...)` — SAG inside the block; on exit the pipeline
    is exactly as it was before (enabled with its old config, or not enabled). CUDA graphs captured
    in the block stay with the model and replay in the next block."""
    before = config_of(pipe)
    enable(pipe, config, **overrides)
    try:
        yield pipe
    finally:
        if before is None:
            disable(pipe)
        else:
            pipe.__dict__[CONFIG_KEY] = before
