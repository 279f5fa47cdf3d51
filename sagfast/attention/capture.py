"""The capture's switch, slots and hooks: how a guided call's rows reach the capture processor and the
terms' rules on a shared model, without changing the model per call.

Installed once per model, when a pipeline is enabled, and dormant otherwise:

- `CaptureSwitch` replaces the capture layer's processor and wraps it. Outside a guided call's model
  pass (no `Capture` in this thread's `ACTIVE` slot, or one that does not arm this layer) it calls the wrapped
  processor exactly as the layer would have; inside the guided call's main pass it runs that call's
  own capture processor (sagfast.attention.processors). Nothing on the model changes per call, so
  pipelines that share the model, threads and plain calls never see another call's capture.
- The same switch sits on each layer a term changes for its rows (PAG's, SEG's): in a model call
  whose rows include such rows, it cuts them out of the layer's batch, runs them through the term's
  attention rule (sagfast.terms.base.AttentionRule) and the other rows as above, and puts them back
  in order.
- Each transformer block a term changes for its rows carries two dormant hooks: `BlockSkipHook` (a
  forward hook: those rows skip the block, a `SkipRule`) and `BlockInputHook` (a forward pre-hook:
  those rows enter the block with one input transformed, an `InputRule`).
- `MapHook`, a forward pre-hook on the module whose input is 4-D (the UNet's Transformer2DModel),
  records the map's true (h, w) for the armed call.
- `install` / `uninstall` put them on a model and take them off (`sagfast.disable`).

`Capture.mask` lays the capture processor's mass over the map and thresholds it.
"""

from __future__ import annotations

import functools
import threading

import torch
from diffusers.models.attention_processor import Attention

from sagfast.core.batch import split_rows
from sagfast.ops.mask import to_map


class ThreadSlot:
    """A value per thread, set for the length of a block: `token = slot.set(v)` ... `slot.reset(token)`.

    A thread-local rather than a ContextVar: torch.compile traces attribute reads of a thread-local
    (and guards on what it read, so one compiled graph serves every call), while `ContextVar.get` is a
    graph break, and the capture switch runs inside a compiled model's forward."""

    def __init__(self):
        self._local = threading.local()

    def get(self):
        return getattr(self._local, "value", None)

    def set(self, value):
        previous = self.get()
        self._local.value = value
        return previous

    def reset(self, token) -> None:
        self._local.value = token


ACTIVE = ThreadSlot()
"""The `Capture` of the guided call whose model pass runs in this thread, or None (set around each
pass by the guided call)."""


class Capture:
    """One guided call's capture: which layer, which rows, and what the main pass recorded."""

    def __init__(self, attn: Attention, owner: torch.nn.Module, patch: int, backend: str, threshold: float, make_processor):
        self.make_processor = make_processor
        """(guide rows, backend, xformers, threshold) -> the capture processor (the family's)."""
        self.attn = attn
        self.owner = owner
        self.patch = patch
        """The map is the owner's 4-D input's (h, w) over this (a transformer's patch size; 1 in a UNet);
        for a video model (frames axis of its 5-D input, temporal patch, patch): its (t, h, w) over those."""
        self.backend = backend
        self.threshold = threshold
        self.armed = False
        self.processor = None
        self.hw = None
        self.ruled = frozenset()
        """The attention modules some term of this call runs differently for its rows (PAG's, SEG's)."""
        self.rules = ()
        """The running model call's (rows, rule) pairs, in batch order (sagfast.terms.base: AttentionRule,
        SkipRule, InputRule)."""

    def rules_for(self, module, kind: str) -> list:
        """The running call's (rows, rule) pairs of rules of `kind` (the rule's `kind`: "attention",
        "skip", "input") that act on `module`: a block may carry one term's skip rule and another's
        input rule in one call."""
        return [(rows, rule) for rows, rule in self.rules if rule.kind == kind and module in rule.layers]

    def reinstall(self) -> None:
        """Before each model pass: the switches back on layers whose processor was replaced since the
        call began (a step callback calling `set_attn_processor`); the new processor runs inside them."""
        install(self.attn, self.owner, self.ruled)

    def arm(self, guide_rows: slice, record_mass: bool, hw=None) -> None:
        """Before the main pass: record (h, w) (unless the call's inputs gave it: `hw`), and the mass
        of the batch rows `guide_rows` when `record_mass`, with the family's capture processor."""
        self.armed, self.hw = True, hw
        inner = self.attn.processor.inner
        xformers = "XFormers" in type(inner).__name__
        self.processor = self.make_processor(guide_rows, self.backend, xformers, self.threshold) if record_mass else None

    def disarm(self) -> None:
        self.armed = False

    def map_size(self, name: str) -> tuple:
        if self.hw is None:
            raise RuntimeError(f"the capture layer {name} did not run in the model's forward")
        return over_patch(self.hw, self.patch)

    def mask(self, name: str) -> torch.Tensor:
        """[guide rows, h, w] bool: `mass > threshold` on the layer's map, from the last main pass."""
        return to_map(self.processor.mask, self.map_size(name))


class CaptureSwitch:
    """The capture layer's processor while any pipeline guides this model: the layer's own processor
    (`inner`) unless the current guided call arms this layer. Same call signature as AttnProcessor2_0
    (diffusers' Attention passes a processor only the keyword arguments its signature names)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        return self.dispatch(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

    def dispatch(self, attn, *args, **kwargs):
        """The layer's call with its arguments in the processor's positional order: rows of terms with
        their own rule on this layer through it (every batched argument cut along, a rotary embedding
        too where it is batched), the others through `plain`."""
        capture = ACTIVE.get()
        rules = capture.rules_for(attn, "attention") if capture is not None else []
        if rules:
            return split_rows(rules, self.plain, self.own, attn, *args, **kwargs)
        return self.plain(attn, *args, **kwargs)

    def plain(self, attn, *args, **kwargs):
        """The layer's rows that no rule changes: the armed call's capture processor, else its own."""
        capture = ACTIVE.get()
        if capture is not None and capture.armed and capture.attn is attn and capture.processor is not None:
            return capture.processor(attn, *args, **kwargs)
        return self.own(attn, *args, **kwargs)

    def own(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        """The wrapped processor, called as the layer would call it."""
        if temb is not None:
            kwargs["temb"] = temb
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, *args, **kwargs)


def input_grid(hidden: torch.Tensor, patch) -> tuple | None:
    """What a capture layer's map owner's input says of the map: the (H, W) of a 4-D input, or a video
    model's (F, H, W) of its 5-D input (`patch`: frames axis, temporal patch, patch); else None."""
    if hidden.dim() == 4:
        return tuple(hidden.shape[-2:])
    if hidden.dim() == 5 and isinstance(patch, tuple):
        return (hidden.shape[patch[0]], *hidden.shape[-2:])
    return None


def over_patch(hw: tuple, patch) -> tuple:
    """The map: `input_grid`'s sizes over the patch ((t, h, w) for a video patch tuple)."""
    if isinstance(patch, tuple):
        _, pt, p = patch
        return (hw[0] // pt, hw[1] // p, hw[2] // p)
    return (hw[0] // patch, hw[1] // patch) if patch > 1 else tuple(hw)


class MapHook:
    """Forward pre-hook on the capture layer's map owner: records the (h, w) of its 4-D input."""

    def __call__(self, module, args, kwargs):
        capture = ACTIVE.get()
        if capture is not None and capture.armed and capture.owner is module and capture.hw is None:
            capture.hw = input_grid(args[0] if args else kwargs["hidden_states"], capture.patch)


@functools.cache
def _forward_signature(cls: type):
    import inspect

    return inspect.signature(cls.forward)


class BlockSkipHook:
    """Forward hook on a transformer block that a term's rows skip (STG's "block" mode, a
    `sagfast.terms.base.SkipRule`): in a model call whose rows include such rows, those rows of the
    block's outputs are the block's inputs (`rule.outputs` names the input each output stands for), as
    if the block were not there. Every other call, and every other row, is the block's own."""

    def __call__(self, module, args, kwargs, output):
        capture = ACTIVE.get()
        rules = capture.rules_for(module, "skip") if capture is not None else []
        if not rules:
            return None
        inputs = _forward_signature(type(module)).bind(module, *args, **kwargs).arguments
        outs = output if isinstance(output, tuple) else (output,)
        kept = list(outs)
        for i, name in enumerate(rules[0][1].outputs):
            kept[i] = outs[i].clone()
            for rows, _ in rules:
                kept[i][rows] = inputs[name][rows]
        return tuple(kept) if isinstance(output, tuple) else kept[0]


class BlockInputHook:
    """Forward pre-hook on a transformer block whose input some term's rows change (a
    `sagfast.terms.base.InputRule`): in a model call whose rows include such rows, the block gets its
    input `rule.argument` with those rows replaced by `rule.transform` of them (a copy: the caller's
    tensor is left as it is); every other input, and every other row, is the block's own. Every other
    call passes through untouched."""

    def __call__(self, module, args, kwargs):
        capture = ACTIVE.get()
        rules = capture.rules_for(module, "input") if capture is not None else []
        if not rules:
            return None
        names = list(_forward_signature(type(module)).parameters)[1:]  # the forward's arguments after self
        args, kwargs = list(args), dict(kwargs)
        for name in dict.fromkeys(rule.argument for _, rule in rules):
            if name in kwargs:
                container, key = kwargs, name
            elif name in names and names.index(name) < len(args):
                container, key = args, names.index(name)
            else:
                raise ValueError(f"{type(module).__name__} was called without its `{name}` input, which a term's rows change")
            original = container[key]
            changed = original.clone()
            for rows, rule in rules:
                if rule.argument == name:
                    changed[rows] = rule.transform(original[rows])
            container[key] = changed
        return tuple(args), kwargs


_INSTALL_LOCK = threading.Lock()


def install(attn: Attention, owner: torch.nn.Module, ruled=()) -> None:
    """Put the switch on `attn` and on the layers terms change (`ruled`) and the map hook on `owner`, unless
    they are there already (a processor set since, by `set_attn_processor` say, is wrapped anew)."""
    with _INSTALL_LOCK:  # two calls on one model in two threads must not wrap a layer twice
        for layer in (attn, *ruled):
            if not hasattr(layer, "set_processor"):  # a block a term's rows skip or enter changed
                if not any(isinstance(h, BlockSkipHook) for h in layer._forward_hooks.values()):
                    layer.register_forward_hook(BlockSkipHook(), with_kwargs=True)
                if not any(isinstance(h, BlockInputHook) for h in layer._forward_pre_hooks.values()):
                    layer.register_forward_pre_hook(BlockInputHook(), with_kwargs=True)
            elif not isinstance(layer.processor, CaptureSwitch):
                layer.set_processor(switch_for(layer)(layer.processor))
        if not any(isinstance(h, MapHook) for h in owner._forward_pre_hooks.values()):
            owner.register_forward_pre_hook(MapHook(), with_kwargs=True)


def uninstall(model: torch.nn.Module) -> None:
    """Give every layer of `model` its own processor back and remove the map and block hooks."""
    for module in model.modules():
        if isinstance(getattr(module, "processor", None), CaptureSwitch):
            module.set_processor(module.processor.inner)
        for key in [k for k, h in module._forward_pre_hooks.items() if isinstance(h, (MapHook, BlockInputHook))]:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
        for key in [k for k, h in module._forward_hooks.items() if isinstance(h, BlockSkipHook)]:
            del module._forward_hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)


def installed(model: torch.nn.Module) -> bool:
    return any(isinstance(getattr(m, "processor", None), CaptureSwitch) for m in model.modules())


class RotaryCaptureSwitch(CaptureSwitch):
    """`CaptureSwitch` for attention modules that hand their processor `image_rotary_emb` as the fifth
    positional argument (Flux's `FluxAttention.forward`: the base switch would take it for `temb`),
    or by name (CogVideoX's `Attention` with CogVideoXAttnProcessor2_0).
    Names the keyword arguments the module forwards (it passes a processor only those its signature
    names), so IP-Adapter inputs still reach a wrapped IP-Adapter processor."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
        ip_hidden_states=None,
        ip_adapter_masks=None,
        *args,
        **kwargs,
    ):
        extra = {k: v for k, v in (("ip_hidden_states", ip_hidden_states), ("ip_adapter_masks", ip_adapter_masks)) if v is not None}
        return self.dispatch(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, *args, **extra, **kwargs)

    def own(self, attn, *args, **kwargs):
        return self.inner(attn, *args, **kwargs)


def switch_for(attn) -> type:
    """The switch class whose call signature matches how `attn` calls its processor."""
    import inspect

    forward = getattr(type(attn), "forward", None)
    params = list(inspect.signature(forward).parameters) if forward is not None else []
    if ("image_rotary_emb" in params or "rotary_emb" in params) and not isinstance(attn, Attention):
        return RotaryCaptureSwitch  # Flux, LTX-Video (image_rotary_emb), Wan (rotary_emb): the fifth positional
    # An `Attention` hands its processor only the keyword arguments the processor's signature names:
    # CogVideoX's processor takes the rotary embedding, so its switch must name it too.
    processor = getattr(attn, "processor", None)
    if processor is not None and "image_rotary_emb" in inspect.signature(processor.__call__).parameters:
        return RotaryCaptureSwitch
    return CaptureSwitch
