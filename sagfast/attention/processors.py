"""The capture processors: a self-attention layer's own computation that also records the attention
mass of the guide rows (`SAGCaptureProcessor`, with the stock diffusers processor signature; the joint
attention of SD3 and Flux), and the helpers every processor here and in sagfast.attention.identity
shares (a layer's input, q/k/v heads, output).

Each computes the layer output with SDPA, asking it for the per-row log-sum-exp
(sagfast.attention.lse), and, for the guide rows of the batch only, the per-key attention mass from q,
k and that log-sum-exp (`sagfast.ops.attention_mass`), thresholded into the mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from sagfast.attention.lse import lse_chunked, sdpa_with_lse, xformers_reasons, xformers_with_lse
from sagfast.ops import attention_mass


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
