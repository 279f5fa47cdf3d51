"""Perturbed-Attention Guidance's perturbation (Ahn et al. 2024): self-attention replaced by the identity.

PAG runs the conditional rows a second time with the self-attention of chosen layers perturbed: every
query attends only to its own key, so the attention output is the value projection. The guided
denoiser puts these rows in a model call beside others (the main batch, SAG's degraded rows); the
capture switch on each chosen layer (sagfast.attention.capture) cuts the perturbed rows out of the layer's
batch, runs them through the family's perturbed attention here, runs the other rows through the
layer's own processor, and puts the rows back in order. So one call can hold perturbed and plain rows,
and no processor on a shared model changes per call.

The references are diffusers' PAG processors: `PAGIdentitySelfAttnProcessor2_0`'s perturbed path
(`identity_attention`) and `PAGJointAttnProcessor2_0`'s (`joint_identity_attention`, SD3's joint
attention: the image-image block of the attention masked to its diagonal).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sagfast.attention.processors import attention_input, attention_output, heads_qkv, text_heads_qkv


def identity_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
    """A diffusers `Attention` layer's output with each token attending only to itself: the value
    projection through the output projection, with the layer's spatial norm, group norm, residual
    connection and output rescale where it has them (diffusers' PAGIdentitySelfAttnProcessor2_0)."""
    tokens, shape = attention_input(attn, hidden_states, temb)
    return attention_output(attn, attn.to_v(tokens), hidden_states, shape)


def joint_identity_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
    """SD3's joint attention (image tokens, then text tokens, one softmax) perturbed as diffusers'
    PAGJointAttnProcessor2_0 does it: an image query attends to its own image key and to the text
    keys (the image-image block masked to its diagonal); a text query attends to every key
    (`joint_identity`). Like the stock processor, ignores `attention_mask`."""
    q, k, v, _ = heads_qkv(attn, hidden_states)
    if encoder_hidden_states is None:  # SD3.5's attn2: plain self-attention over the image tokens
        return attn.to_out[1](attn.to_out[0](v.transpose(1, 2).flatten(2).to(hidden_states.dtype)))
    eq, ek, ev = text_heads_qkv(attn, encoder_hidden_states)
    image_out, text_out = joint_identity(q, k, v, eq, ek, ev)
    image_out = attn.to_out[1](attn.to_out[0](image_out.transpose(1, 2).flatten(2)))
    text_out = text_out.transpose(1, 2).flatten(2)
    if not attn.context_pre_only:
        text_out = attn.to_add_out(text_out)
    return image_out, text_out


def joint_identity(q, k, v, eq, ek, ev, text_keep=None):
    """PAG's joint attention on heads ([B, H, N, D] image, [B, H, T, D] text, after any norms and
    rotary embedding): an image query attends to its own image key and to the text keys, a text query
    to every key; (image out, text out) in q's dtype. The stock processors' default scale.
    `text_keep` [B, T] bool: the text keys attended (a padding mask, HunyuanVideo's), or None: all.

    Computed without the (N + T)^2 mask: an image query's softmax runs over 1 + T scores (its own key,
    then the text keys), so memory is O(N * T)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    own = (q.float() * k.float()).sum(-1, keepdim=True) * scale
    text = torch.matmul(q.float(), ek.float().transpose(-1, -2)) * scale
    mask = None
    if text_keep is not None:
        text = text.masked_fill(~text_keep[:, None, None, :], float("-inf"))
        keep = torch.cat([torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device), text_keep], dim=1)
        mask = keep[:, None, None, :]
    weights = torch.softmax(torch.cat([own, text], dim=-1), dim=-1)
    image_out = weights[..., :1] * v.float() + torch.matmul(weights[..., 1:], ev.float())
    text_out = F.scaled_dot_product_attention(eq, torch.cat([k, ek], dim=2), torch.cat([v, ev], dim=2), attn_mask=mask)
    return image_out.to(q.dtype), text_out.to(q.dtype)


def value_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
    """A self-attention layer whose processor is q, k, v projections, attention and `to_out` (Wan's
    and LTX-Video's attn1) with each token attending only to itself: the value projection through
    the output projection (the rotary embedding and the q / k norms then play no part)."""
    return attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))
