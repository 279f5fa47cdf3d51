"""Capture of the attention mass in one self-attention layer, without the N x N map: all of it here.

Installed once per model, when a pipeline is enabled, and dormant otherwise:

- `CaptureSwitch` replaces the capture layer's processor and wraps it. Outside a guided call's model
  pass (no `Capture` in this thread's `ACTIVE` slot, or one that does not arm this layer) it calls the wrapped
  processor exactly as the layer would have; inside the guided call's main pass it runs that call's
  own `SAGCaptureProcessor`. Nothing on the model changes per call, so pipelines that share the model,
  threads and plain calls never see another call's capture.
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

`SAGCaptureProcessor` has the stock diffusers processor signature. It computes the layer output with
SDPA (asking SDPA for the per-row log-sum-exp it computes anyway) and, for the guide rows of the batch
only, the per-key attention mass from q, k and that log-sum-exp (`sagfast.ops.attention_mass`).
`Capture.mask` lays the mass over the map and thresholds it.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from sagfast.core.batch import split_rows
from sagfast.ops import attention_mass
from sagfast.ops.mask import to_map


def lse_chunked(q, k, scale, bias=None):
    """Row log-sum-exp in fp32, a block of queries at a time (for devices SDPA gives no lse on); `bias`
    an additive key mask broadcast to [B, H, N, Nk] (a key padding mask: [B, 1, 1, Nk])."""
    b, h, n, _ = q.shape
    # A block of scores is 32 MiB in fp32 (256 MiB on a GPU, where fewer, larger matmuls pay).
    budget = 1 << (26 if q.device.type == "cuda" else 23)
    rows = max(1, budget // max(1, b * h * k.shape[2]))
    bias = 0.0 if bias is None else bias.float()
    keys = k.float().transpose(-1, -2)
    parts = [torch.logsumexp(torch.matmul(q[:, :, i : i + rows].float(), keys) * scale + bias, dim=-1) for i in range(0, n, rows)]
    return torch.cat(parts, dim=2)


@functools.cache
def _flash_runs_on(device: torch.device) -> bool:
    """Whether torch's flash-attention kernel exists in this build and runs on this GPU (sm80+)."""
    return torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def key_bias(keep: torch.Tensor, dtype) -> torch.Tensor:
    """A boolean key mask (True: attended) as the additive mask SDPA takes: 0 or -inf."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))


def sdpa_with_lse(q, k, v, scale: float, bias=None):
    """(out, lse) of softmax attention; q, k, v [B, H, N, D]; lse [B, H, N] fp32 (natural log). `bias`:
    an additive key mask ([B, 1, 1, Nk], 0 or -inf: a text padding mask) on CPU tensors, or None (on a
    GPU, `SAGCaptureProcessor.attend` takes a masked layer's lse for the guide rows only)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        return out, lse
    if bias is not None:
        raise ValueError(f"sdpa_with_lse takes a key mask on CPU tensors only, got {q.device.type} tensors")
    if q.device.type == "cuda":
        d = q.shape[-1]
        if q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256 and _flash_runs_on(q.device):
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
            return res[0], res[1]
        res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
        return res[0], res[1][:, :, : q.shape[2]]
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out, lse_chunked(q, k, scale)


def xformers_reasons(q=None) -> list:
    """Why the capture layer cannot take its output and lse from xformers (empty when it can)."""
    why = []
    try:
        import xformers.ops.fmha  # noqa: F401
    except Exception as e:  # not installed, or built for another torch
        why.append(f"xformers is not importable ({type(e).__name__}: {e})")
    if q is not None and q.device.type != "cuda":
        why.append(f"xformers runs on CUDA tensors, got {q.device.type}")
    return why


def xformers_with_lse(q, k, v, scale: float):
    """(out, lse) from xformers' memory-efficient forward; q, k, v [B, H, N, D] as sdpa_with_lse."""
    from xformers.ops import fmha

    out, lse = fmha.memory_efficient_attention_forward_requires_grad(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=None, p=0.0, scale=scale
    )
    # xformers pads the lse's query dim up to its block size.
    return out.transpose(1, 2), lse[:, :, : q.shape[2]].float()


def attention_input(attn, hidden_states: torch.Tensor, temb=None):
    """(tokens [B, N, C], the input's 4-D shape or None): what a diffusers `Attention` layer's processor
    does before its projections (spatial norm, 4-D to tokens, group norm), as AttnProcessor2_0."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = tuple(hidden_states.shape) if hidden_states.ndim == 4 else None
    if shape is not None:
        hidden_states = hidden_states.view(shape[0], shape[1], -1).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, shape


def attention_output(attn, hidden_states: torch.Tensor, residual: torch.Tensor, shape):
    """The processor's end from the attention's tokens [B, N, inner]: output projection, back to the
    4-D `shape` (from `attention_input`), residual connection, rescale."""
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if shape is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def heads_qkv(attn, hidden_states: torch.Tensor):
    """(q, k, v as [B, H, N, D], D) of a diffusers attention layer's projections, norms applied."""
    batch = hidden_states.shape[0]
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, head_dim


def text_heads_qkv(attn, encoder_hidden_states: torch.Tensor):
    """(q, k, v as [B, H, T, D]) of a joint attention layer's text tokens (SD3's added projections),
    the added norms applied."""
    batch, heads = encoder_hidden_states.shape[0], attn.heads
    q, k, v = (p(encoder_hidden_states) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    q, k, v = (t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    if attn.norm_added_q is not None:
        q = attn.norm_added_q(q)
    if attn.norm_added_k is not None:
        k = attn.norm_added_k(k)
    return q, k, v


class SAGCaptureProcessor:
    """Self-attention processor that also records the attention mass of the guide rows: the first
    `guide` rows (an int) or the rows `guide` (a slice, or an index tensor).

    After a call, `self.mass` is [guide rows, N] fp32 and `self.mask` is `mass > threshold` (bool, from
    the same kernel). Accepts what `AttnProcessor2_0` accepts on a
    self-attention layer, except an attention mask (SD's self-attention layers never get one).
    """

    def __init__(self, guide, backend: str = "auto", xformers: bool = False, threshold: float = 1.0):
        self.rows = slice(0, guide) if isinstance(guide, int) else guide
        self.threshold = threshold
        self.backend = backend
        self.xformers = xformers
        """Take output and lse from xformers (the layer's own processor was xformers') where it can run
        on these inputs; otherwise SDPA."""
        self.mass = None
        self.mask = None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("SAG's capture layer must be a self-attention layer; it was given encoder_hidden_states")
        if attention_mask is not None:
            raise ValueError("SAG's capture layer does not take an attention mask")
        residual = hidden_states
        hidden_states, shape = attention_input(attn, hidden_states, temb)
        batch = hidden_states.shape[0]
        query, key, value, head_dim = heads_qkv(attn, hidden_states)

        if self.xformers and not xformers_reasons(query):
            out, lse = xformers_with_lse(query, key, value, attn.scale)
        else:
            out, lse = sdpa_with_lse(query, key, value, attn.scale)
        g = self.rows
        self.mass, self.mask = attention_mass(query[g], key[g], lse[g], attn.scale, backend=self.backend, threshold=self.threshold)

        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return attention_output(attn, hidden_states, residual, shape)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: slice = slice(None), bias=None) -> torch.Tensor:
        """Attention of q, k, v [B, H, N, D] with SDPA's default scale, recording the mass and mask of
        the `keys` tokens received from those same query tokens of the guide rows (each query's softmax
        over all keys, `bias` an additive key mask or None); the output as [B, N, H * D] (the video
        families' processors)."""
        scale = 1.0 / math.sqrt(q.shape[-1])
        if bias is not None and q.device.type != "cpu":
            # A key mask on a GPU: the layer's output from SDPA, and the lse of the guide rows only, in a
            # second, blockwise pass (no fused kernel here returns both with a mask).
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)
            g = self.rows
            lse = lse_chunked(q[g], k[g], scale, bias[g] if bias.shape[0] == q.shape[0] else bias)
            self.mass, self.mask = attention_mass(
                q[g][:, :, keys], k[g][:, :, keys], lse[:, :, keys], scale, backend=self.backend, threshold=self.threshold
            )
        else:
            out, lse = _joint_out_and_lse(self, q, k, v, scale, bias)
            _image_mass(self, q, k, lse, keys, scale)
        return out.transpose(1, 2).flatten(2, 3).to(q.dtype)


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


# --- Joint attention (SD3, Flux): image and text tokens in one softmax --------------------------------


def _joint_out_and_lse(processor, q, k, v, scale, bias=None):
    """(out, lse) of the capture layer's one attention call, from xformers where the layer's own
    processor was xformers' and xformers can run (without a key mask), else SDPA."""
    if processor.xformers and bias is None and not xformers_reasons(q):
        return xformers_with_lse(q, k, v, scale)
    return sdpa_with_lse(q, k, v, scale, bias)


def _image_mass(processor, q, k, lse, image: slice, scale):
    """Mass of the image keys received from the image queries of the guide rows, each row's softmax
    taken over ALL keys (image and text: `lse` is the joint attention's)."""
    g = processor.rows
    processor.mass, processor.mask = attention_mass(
        q[g, :, image], k[g, :, image], lse[g, :, image], scale, backend=processor.backend, threshold=processor.threshold
    )


class JointCaptureProcessor(SAGCaptureProcessor):
    """SD3's joint attention (`JointAttnProcessor2_0`: image tokens then text tokens in one SDPA) that
    also records the attention mass of the image keys from the image queries of the guide rows, with
    each query's softmax over all keys (image and text), as the layer computes it. The output is the
    stock processor's: SDPA on the full joint sequence (its default scale, 1 / sqrt(head dim)), split
    back into image and text. Without `encoder_hidden_states` (SD3.5's `attn2`) it is plain
    self-attention over the image tokens. Like the stock processor it ignores `attention_mask`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        import math

        residual = hidden_states
        batch = hidden_states.shape[0]
        query, key, value, head_dim = heads_qkv(attn, hidden_states)
        n_image = query.shape[2]
        if encoder_hidden_states is not None:
            eq, ek, ev = text_heads_qkv(attn, encoder_hidden_states)
            query = torch.cat([query, eq], dim=2)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)

        scale = 1.0 / math.sqrt(head_dim)  # the stock processor calls SDPA with its default scale
        out, lse = _joint_out_and_lse(self, query, key, value, scale)
        _image_mass(self, query, key, lse, slice(0, n_image), scale)

        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1] :]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxCaptureProcessor(SAGCaptureProcessor):
    """Flux's attention (`FluxAttnProcessor`: in the double-stream blocks text tokens FIRST, then image
    tokens, one SDPA after RoPE) that also records the attention mass of the image keys from the image
    queries of the guide rows, each query's softmax over all keys. The output is the stock processor's
    (the native attention backend: SDPA with its default scale). No attention mask, no IP-Adapter
    inputs (the stock FluxAttnProcessor's inputs only)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, *args, **kwargs):
        import math

        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise ValueError("SAG's Flux capture layer does not take an attention mask")
        if kwargs.get("ip_hidden_states") is not None:
            raise ValueError("SAG's Flux capture layer does not take IP-Adapter inputs; choose a layer without them")
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        n_text = 0
        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            n_text = encoder_query.shape[1]
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, N, D]
        scale = 1.0 / math.sqrt(attn.head_dim)
        out, lse = _joint_out_and_lse(self, q, k, v, scale)
        _image_mass(self, q, k, lse, slice(n_text, q.shape[2]), scale)

        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


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
