"""CUDA graphs of the guided step: one graph per (variant, input structure, shapes, dtypes).

A step of SAG is many small launches around one or two model calls (capture, x0/eps, mask, blur,
re-noise, combine, and the Python that strings them together). Captured once, a step replays as one
graph launch: the inputs are copied into static buffers, the graph replays, the static output is
copied out. Per-step scalars (abar, the timestep) are device tensors among the inputs, so nothing in
the captured region synchronizes with the host.

A graph also bakes in what is not among its inputs: the addresses of the weights and which attention
processors run. `StepGraphs.run` reads a fingerprint of those (`ModelWatch`) and drops every graph
when it changes (weights moved or cast, a LoRA loaded, processors swapped). What the fingerprint does
not see (adapter weights set with `set_adapters`, a Python attribute a layer reads) needs
`sagfast.drop_graphs(pipe)`.

Graphs belong to the model they were captured on (`graphs_of`), not to a pipeline or a call: they
replay in the next call, in another pipeline sharing the model and after `disable` + `enable`, and
go with the model (a copy of the model captures its own).
"""

from __future__ import annotations

import threading
import warnings
import weakref

import torch
from diffusers.models.attention_processor import Attention
from torch.utils import _pytree as pytree

from sagfast.attention.capture import CaptureSwitch


def _leaf_key(leaf):
    if torch.is_tensor(leaf):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride())
    hash(leaf)  # non-tensor leaves are part of the key; an unhashable one makes the step ungraphable
    return leaf


def _address(t: torch.Tensor) -> int:
    try:
        return t.data_ptr()
    except RuntimeError:  # a tensor subclass with no storage of its own (quantized weights, ...)
        return 0


class ModelWatch:
    """What a captured graph of `model` bakes in besides its inputs: the addresses of its weights, the
    processors of its attention layers, the LoRA adapters loaded. The tensors and layers are listed
    once: reading their addresses each step costs 46 us on SD 1.5's 686 tensors, where walking the
    module tree afresh costs 1.6 ms (both measured on the 2-core AMD EPYC dev machine)."""

    def __init__(self, model: torch.nn.Module):
        # Weakly: the graph cache is keyed weakly by the model, and a strong reference here would keep
        # the model (and its GPU memory) alive for ever.
        self.model = weakref.ref(model)
        self.tensors = list(model.parameters()) + list(model.buffers())
        # Attention and FluxAttention alike: every module that runs a swappable processor.
        self.attention = [m for m in model.modules() if isinstance(m, Attention) or hasattr(m, "set_processor")]

    def fingerprint(self) -> tuple:
        """Compared with ==. It holds the processors themselves, so a freed processor's id cannot
        come back as a new processor's."""
        return (
            hash(tuple(_address(t) for t in self.tensors)),  # .to(), .half(), offload: new addresses
            # The capture switch is put on and taken off around guided calls that no enabled pipeline
            # holds (the drop-in's): what a graph bakes in is the processor it wraps.
            tuple(m.processor.inner if isinstance(m.processor, CaptureSwitch) else m.processor for m in self.attention),
            tuple(getattr(self.model(), "peft_config", None) or ()),  # adapter names: LoRA loaded or unloaded
        )

    def refusals(self) -> list[str]:
        """Why steps of the model must not be graphed in its present setting (empty when they may)."""
        why = []
        hooked = [n for n, m in self.model().named_modules() if hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook")]
        if hooked:
            # Offloading moves weights between calls; a replay runs no hooks and reads stale addresses.
            why.append(f"the model has accelerate/diffusers hooks (CPU or group offload) on {hooked[:3]}")
        if any(t.numel() and _address(t) == 0 for t in self.tensors):
            why.append(
                "some weights are tensor subclasses without storage of their own (quantized weights?), whose moves a graph cannot follow"
            )
        return why


class _Graph:
    def __init__(self, fn, inputs, state, pool, stream):
        leaves, self.spec = pytree.tree_flatten(inputs)
        # Normal tensors even when captured under torch.inference_mode: replays outside it copy into them.
        with torch.inference_mode(False):
            self.static = [leaf.clone() if torch.is_tensor(leaf) else leaf for leaf in leaves]
        static_inputs = pytree.tree_unflatten(self.static, self.spec)
        # The warm-up runs the step for real, which would overwrite the state the step reads (the
        # previous evaluation's eps and mask in batched mode): keep it and put it back before capture,
        # also when the warm-up raises (the caller then runs the step eagerly on the same state).
        saved = [t.clone() for t in state]
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                fn(static_inputs)  # fills the dispatch cache, allocates state buffers, compiles kernels
        finally:
            torch.cuda.current_stream().wait_stream(stream)
            for t, s in zip(state, saved):
                t.copy_(s)
        self.graph = torch.cuda.CUDAGraph()
        before = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(self.graph, pool=pool, stream=stream):
                self.out = fn(static_inputs)
        finally:
            # torch.cuda.graph leaves its capture stream current when capture_end raises (an
            # invalidated capture): the eager fallback must run on the caller's stream.
            torch.cuda.set_stream(before)

    def __call__(self, inputs) -> torch.Tensor:
        leaves, _ = pytree.tree_flatten(inputs)
        for dst, src in zip(self.static, leaves):
            if torch.is_tensor(dst):
                dst.copy_(src, non_blocking=True)
        self.graph.replay()
        # Cloned before any other graph of the shared pool replays over the static output.
        return self.out.clone()


class StepGraphs:
    """The graphs of one model's guided steps. `run` returns None when the step cannot be graphed (the
    caller then runs it eagerly); it warns once per reason. `state` holds the batched-mode buffers the
    graphs read and write (they must outlive a call, as the graphs do). Calls from several threads
    take turns.

    All graphs share one memory pool and one capture stream: they never replay concurrently, each
    output is cloned right after its replay, and static inputs and state buffers live outside the
    pool, so one graph's temporaries may reuse another's (a pool per graph would hold a UNet forward's
    activations for every shape and variant)."""

    def __init__(self, model: torch.nn.Module):
        self.watch = ModelWatch(model)
        self.state: dict = {}
        self.lock = threading.RLock()
        self._graphs: dict = {}
        self._refused: set = set()  # keys whose capture failed: they run eagerly
        self._fingerprint = None
        self._model_refusals: list = []
        self._warned: set = set()
        self._pool = None
        self._stream = None

    @staticmethod
    def key(variant, inputs):
        """The graph `inputs` replay on: the variant (what the step bakes in), structure, and every
        tensor's shape, dtype, device and strides (never values); raises TypeError for an unhashable
        non-tensor input."""
        leaves, spec = pytree.tree_flatten(inputs)
        return (variant, spec, tuple(_leaf_key(leaf) for leaf in leaves))

    def run(self, variant, fn, inputs, state=()):
        with self.lock:
            return self._run(variant, fn, inputs, state)

    def _run(self, variant, fn, inputs, state):
        fingerprint = self.watch.fingerprint()
        if fingerprint != self._fingerprint:
            self.clear()
            self._fingerprint = fingerprint
            self._model_refusals = self.watch.refusals()
        for reason in self._model_refusals:
            self.refuse(reason)
        if self._model_refusals:
            return None
        if torch.is_autocast_enabled("cuda"):
            # A graph replays the precision it was captured with, and with the autocast cache on it would
            # read casts of the weights that are freed when the context exits.
            self.refuse("the pipeline runs under torch.autocast (cast the pipeline to the dtype instead)")
            return None
        try:
            key = self.key(variant, inputs)
        except TypeError as e:
            self.refuse(f"an input is neither a tensor nor hashable ({e})")
            return None
        if key in self._refused:
            return None
        device = next(leaf.device for leaf in pytree.tree_leaves(inputs) if torch.is_tensor(leaf))
        with torch.cuda.device(device):
            graph = self._graphs.get(key)
            if graph is None:
                if self._pool is None:
                    self._pool, self._stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(device)
                try:
                    graph = _Graph(fn, inputs, list(state), self._pool, self._stream)
                except Exception as e:  # capture fails on host syncs, unsupported ops...
                    self._refused.add(key)
                    self.refuse(f"capture of the {variant[0]} step failed: {type(e).__name__}: {e}")
                    torch.cuda.synchronize(device)
                    self._abandon_pool(device)
                    return None
                self._graphs[key] = graph
            return graph(inputs)

    def _abandon_pool(self, device: torch.device) -> None:
        """After a failed capture the allocator may still route allocations to the shared pool (torch
        stops that only when capture_end succeeds): stop it, and give later captures a fresh pool. The
        graphs already captured keep the old one alive."""
        try:
            torch._C._cuda_endAllocateToPool(device.index, self._pool)
        except RuntimeError:  # routing had already ended
            pass
        self._pool = None

    def refuse(self, reason: str) -> None:
        """Warn, once per reason, that a step runs without a graph."""
        if reason in self._warned:
            return
        self._warned.add(reason)
        warnings.warn(f"sagfast: running this step without a CUDA graph: {reason}", RuntimeWarning, stacklevel=4)

    def clear(self) -> None:
        """Drop every graph (and with them the memory of their pool); reasons already warned about stay
        quiet."""
        self._graphs.clear()
        self._refused.clear()
        self._fingerprint = None
        self._model_refusals = []
        self._pool = self._stream = None


_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GRAPHS_LOCK = threading.Lock()


def graphs_of(model: torch.nn.Module) -> StepGraphs:
    """The StepGraphs of `model`, made on first use; freed with the model."""
    with _GRAPHS_LOCK:
        graphs = _GRAPHS.get(model)
        if graphs is None:
            graphs = _GRAPHS[model] = StepGraphs(model)
        return graphs


def drop_graphs_of(model: torch.nn.Module) -> None:
    with _GRAPHS_LOCK:
        graphs = _GRAPHS.get(model)
    if graphs is not None:
        with graphs.lock:
            graphs.clear()
