"""CUDA graphs of the guided step: one graph per (variant, input structure, shapes, dtypes).

A step of SAG is many small launches around one or two model calls (capture, x0/eps, mask, blur,
re-noise, combine, and the Python that strings them together). Captured once, a step replays as one
graph launch: the inputs are copied into static buffers, the graph replays, the static output is
copied out. Per-step scalars (abar, the timestep) are device tensors among the inputs, so nothing in
the captured region synchronizes with the host.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils import _pytree as pytree


def _leaf_key(leaf):
    if torch.is_tensor(leaf):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride())
    hash(leaf)  # non-tensor leaves are part of the key; an unhashable one makes the step ungraphable
    return leaf


class _Graph:
    def __init__(self, fn, inputs, state):
        leaves, self.spec = pytree.tree_flatten(inputs)
        self.static = [leaf.clone() if torch.is_tensor(leaf) else leaf for leaf in leaves]
        static_inputs = pytree.tree_unflatten(self.static, self.spec)
        # The warm-up runs the step for real, which would overwrite the state the step reads (the
        # previous evaluation's eps and mask in batched mode): keep it and put it back before capture.
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(static_inputs)  # fills the dispatch cache, allocates state buffers, autotunes
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(state, saved):
            t.copy_(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(static_inputs)

    def __call__(self, inputs) -> torch.Tensor:
        leaves, _ = pytree.tree_flatten(inputs)
        for dst, src in zip(self.static, leaves):
            if torch.is_tensor(dst):
                dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.out.clone()


class StepGraphs:
    """The graphs of one guided denoiser. `run` returns None when the step cannot be graphed (the
    caller then runs it eagerly); it warns once per reason."""

    def __init__(self):
        self._graphs: dict = {}
        self._refused: dict = {}

    @staticmethod
    def key(variant: str, inputs):
        """The graph `inputs` replay on: variant, structure, and every tensor's shape, dtype, device and
        strides (never values); raises TypeError for an unhashable non-tensor input."""
        leaves, spec = pytree.tree_flatten(inputs)
        return (variant, spec, tuple(_leaf_key(leaf) for leaf in leaves))

    def run(self, variant: str, fn, inputs, state=()):
        try:
            key = self.key(variant, inputs)
        except TypeError as e:
            self._refuse(None, f"an input is neither a tensor nor hashable ({e})")
            return None
        if key in self._refused:
            return None
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = _Graph(fn, inputs, list(state))
            except Exception as e:  # capture fails on host syncs, unsupported ops, CPU tensors...
                self._refuse(key, f"capture of the {variant} step failed: {type(e).__name__}: {e}")
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                return None
            self._graphs[key] = graph
        return graph(inputs)

    def _refuse(self, key, reason: str) -> None:
        if key is not None:
            self._refused[key] = reason
        warnings.warn(f"sagfast: running this step without a CUDA graph: {reason}", RuntimeWarning, stacklevel=4)

    def clear(self) -> None:
        self._graphs.clear()
        self._refused.clear()
