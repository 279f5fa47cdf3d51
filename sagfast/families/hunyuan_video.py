"""HunyuanVideo (HunyuanVideoPipeline): `pipe.transformer` a HunyuanVideoTransformer3DModel called on
`hidden_states` [B, C, F, H, W] with text `encoder_hidden_states` and their `encoder_attention_mask`,
`pooled_projections`, `timestep` and the embedded guidance `guidance` (the model is guidance distilled:
every call is one branch, and SAG guides its rows, as on Flux). Flow matching.

True CFG (`true_cfg_scale > 1` with a negative prompt) is two calls per step, cond then uncond,
combined with `neg + true_cfg_scale * (cond - neg)`, as Wan's CFG: sagfast joins them into one
[uncond, cond] batch (`GuidedCall.sequential_step`), so SAG guides the unconditional branch exactly.

Capture layer "mid": the joint attention `attn` of the double-stream block transformer_blocks[N // 2].
Its processor (HunyuanVideoAttnProcessor2_0) runs video tokens THEN text tokens through one softmax,
RoPE on the video part, and masks the padded text keys (the model's attention mask: the valid text
tokens of each row). The capture processor takes the mass of the video keys received from the video
queries, each query's softmax over the keys that row attends (the padding excluded, as the layer
excludes it). The map is the layer's true (t, h, w) grid: the 5-D input's (F, H, W) over the patch.

PAG perturbs the joint attention as diffusers perturbs SD3's (a video query attends to its own key and
the valid text keys); STG skips whole blocks or their attention. SEG is not offered.
"""

from __future__ import annotations

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from sagfast.attention.identity import joint_identity
from sagfast.attention.lse import key_bias
from sagfast.attention.processors import SAGCaptureProcessor
from sagfast.families.base import Family, stack_layers, transformer_block_layer, true_cfg


def hunyuan_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """(q, k, v [B, H, N + T, D], N) of HunyuanVideoAttnProcessor2_0: video tokens then text tokens
    (a single-stream block's attention projects both with to_q; a double-stream one the text with its
    added projections), the q / k norms, RoPE on the N video tokens."""
    from diffusers.models.embeddings import apply_rotary_emb

    n = hidden_states.shape[1]
    joint = attn.add_q_proj is None and encoder_hidden_states is not None
    x = torch.cat([hidden_states, encoder_hidden_states], dim=1) if joint else hidden_states
    q, k, v = (p(x).unflatten(2, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if image_rotary_emb is not None:
        q = torch.cat([apply_rotary_emb(q[:, :n], image_rotary_emb, sequence_dim=1), q[:, n:]], dim=1)
        k = torch.cat([apply_rotary_emb(k[:, :n], image_rotary_emb, sequence_dim=1), k[:, n:]], dim=1)
    if attn.add_q_proj is not None and encoder_hidden_states is not None:
        eq, ek, ev = (p(encoder_hidden_states).unflatten(2, (attn.heads, -1)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        q, k, v = torch.cat([q, eq], dim=1), torch.cat([k, ek], dim=1), torch.cat([v, ev], dim=1)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), n


def hunyuan_output(attn, out: torch.Tensor, n: int, encoder_hidden_states):
    """The processor's end from the attention's tokens [B, N + T, inner]: (video, text), each through
    its output projection where the layer has one."""
    if encoder_hidden_states is None:
        return out, None
    video, text = out[:, :n], out[:, n:]
    if getattr(attn, "to_out", None) is not None:
        video = attn.to_out[1](attn.to_out[0](video))
    if getattr(attn, "to_add_out", None) is not None:
        text = attn.to_add_out(text)
    return video, text


class HunyuanVideoCaptureProcessor(SAGCaptureProcessor):
    """HunyuanVideoAttnProcessor2_0 that also records the mass of the video keys from the video queries
    of the guide rows (SDPA with its default scale and the layer's key mask, as the stock processor)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, *args, **kwargs):
        q, k, v, n = hunyuan_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        bias = None
        if attention_mask is not None:
            bias = key_bias(attention_mask, q.dtype) if attention_mask.dtype == torch.bool else attention_mask.to(q.dtype)
        return hunyuan_output(attn, self.attend(q, k, v, keys=slice(0, n), bias=bias), n, encoder_hidden_states)


def hunyuan_identity_attention(
    attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, *args, **kwargs
):
    """PAG's (and STG's "attention" mode's) perturbed HunyuanVideo attention: a video query attends to
    its own key and to the valid text keys, a text query to every valid key (`joint_identity`)."""
    q, k, v, n = hunyuan_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
    keep = None
    if attention_mask is not None:  # bool (True: attended), or additive (0: attended)
        mask = attention_mask.reshape(attention_mask.shape[0], -1)[:, n:]
        keep = mask if mask.dtype == torch.bool else mask == 0
    video, text = joint_identity(q[:, :, :n], k[:, :, :n], v[:, :, :n], q[:, :, n:], k[:, :, n:], v[:, :, n:], keep)
    return hunyuan_output(attn, torch.cat([video, text], dim=2).transpose(1, 2).flatten(2), n, encoder_hidden_states)


class HunyuanVideoFamily(Family):
    name = "HunyuanVideo"
    attribute = "transformer"
    model_class = "HunyuanVideoTransformer3DModel"
    pipelines = ("HunyuanVideoPipeline",)
    sample_argument = "hidden_states"
    token_grid = "thw"
    blocks = "transformer_blocks"
    block_outputs = ("hidden_states", "encoder_hidden_states")

    def cfg_chunks(self, pipe, arguments: dict) -> int:
        return 1  # guidance distilled: each model call is one branch

    def sequential_cfg(self, pipe, attribute: str, arguments: dict):
        """True CFG: the call's true_cfg_scale when it is > 1 and the call has a negative prompt (as the
        pipeline decides it), else None."""
        return true_cfg(arguments)

    def self_attention_layers(self, model) -> list[str]:
        return stack_layers(model, "transformer_blocks", "attn") + stack_layers(model, "single_transformer_blocks", "attn")

    def self_attention_of(self, block):
        return block.attn

    perturbed_attention = staticmethod(hunyuan_identity_attention)

    def resolve_layer(self, model, layers: str):
        name, attn = transformer_block_layer(model, layers, attention="attn")
        original = getattr(model, "_orig_mod", model)
        # The input is [B, C, F, H, W]: frames on axis 2.
        return name, attn, original, (2, original.config.patch_size_t, original.config.patch_size)

    def capture_processor(self, guide: slice, backend: str, xformers: bool, threshold: float):
        return HunyuanVideoCaptureProcessor(guide, backend, xformers, threshold)

    def wrap_output(self, out):
        return Transformer2DModelOutput(sample=out)
