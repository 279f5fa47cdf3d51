"""CogVideoX (CogVideoXPipeline): `pipe.transformer` a CogVideoXTransformer3DModel called on
`hidden_states` [B, F, C, H, W] (latent frames first) with `encoder_hidden_states` and `timestep`,
and the pipeline's 3-D rotary embedding (`image_rotary_emb`). CFG batches [uncond, cond], decided by
the pipeline's `do_classifier_free_guidance`; the schedulers (CogVideoXDDIMScheduler,
CogVideoXDPMScheduler) are variance preserving with v-prediction.

Capture layer "mid": `attn1` of transformer_blocks[N // 2]. Its processor (CogVideoXAttnProcessor2_0)
runs text tokens THEN video tokens through one softmax, after RoPE on the video part; the capture
processor takes the mass of the VIDEO keys received from the VIDEO queries, each query's softmax
over all keys. The map is the layer's true (t, h, w) grid: the latent's frames over the temporal
patch (none in CogVideoX 1.0, `patch_size_t` in 1.5), and (H, W) over the patch size, in the order
the transformer flattens its tokens (frame, row, column).

SAG blurs the predicted x0 per frame in (h, w) (sagfast.terms.sag.degraded_input). PAG perturbs the
joint attention as diffusers perturbs SD3's; STG skips blocks (both streams) or their attention; SEG
is refused (its query blur is 2-D).
"""

from __future__ import annotations

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from sagfast.attention.identity import joint_identity
from sagfast.attention.processors import SAGCaptureProcessor, heads_qkv
from sagfast.families.base import Family, transformer_block_layer


class CogVideoXCaptureProcessor(SAGCaptureProcessor):
    """CogVideoXAttnProcessor2_0 that also records the mass of the video keys from the video queries of
    the guide rows (SDPA with its default scale, as the stock processor; no attention mask)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("SAG's CogVideoX capture layer does not take an attention mask")
        query, key, value, n_text = cogvideox_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = attn.to_out[1](attn.to_out[0](self.attend(query, key, value, keys=slice(n_text, query.shape[2]))))
        text, video_out = out.split([n_text, out.shape[1] - n_text], dim=1)
        return video_out, text


def cogvideox_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """(q, k, v [B, H, T + N, D], T) of CogVideoXAttnProcessor2_0: text tokens then video tokens, the
    norms on both, RoPE on the video part."""
    from diffusers.models.embeddings import apply_rotary_emb

    n_text = encoder_hidden_states.shape[1]
    query, key, value, _ = heads_qkv(attn, torch.cat([encoder_hidden_states, hidden_states], dim=1))
    if image_rotary_emb is not None:
        query = torch.cat([query[:, :, :n_text], apply_rotary_emb(query[:, :, n_text:], image_rotary_emb)], dim=2)
        key = torch.cat([key[:, :, :n_text], apply_rotary_emb(key[:, :, n_text:], image_rotary_emb)], dim=2)
    return query, key, value, n_text


def cogvideox_identity_attention(
    attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, *args, **kwargs
):
    """PAG's (and STG's "attention" mode's) perturbed CogVideoX attention: as SD3's joint attention is
    perturbed (diffusers' PAGJointAttnProcessor2_0), a video query attends to its own key and to the
    text keys, a text query to every key; (video out, text out) as the stock processor returns them."""
    q, k, v, n = cogvideox_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
    video, text = joint_identity(q[:, :, n:], k[:, :, n:], v[:, :, n:], q[:, :, :n], k[:, :, :n], v[:, :, :n])
    out = attn.to_out[1](attn.to_out[0](torch.cat([text, video], dim=2).transpose(1, 2).flatten(2)))
    return out[:, n:], out[:, :n]


class CogVideoXFamily(Family):
    name = "CogVideoX"
    attribute = "transformer"
    model_class = "CogVideoXTransformer3DModel"
    pipelines = ("CogVideoXPipeline",)
    sample_argument = "hidden_states"
    token_grid = "thw"
    blocks = "transformer_blocks"
    block_outputs = ("hidden_states", "encoder_hidden_states")

    perturbed_attention = staticmethod(cogvideox_identity_attention)

    def resolve_layer(self, model, layers: str):
        name, attn = transformer_block_layer(model, layers)
        original = getattr(model, "_orig_mod", model)
        # The input is [B, F, C, H, W]: frames on axis 1, over the temporal patch (CogVideoX 1.5).
        return name, attn, original, (1, original.config.patch_size_t or 1, original.config.patch_size)

    def to_image(self, x: torch.Tensor, call: dict) -> torch.Tensor:
        return x.transpose(1, 2)  # [B, C, F, H, W]: channels second, as the ops and x0 / eps expect

    def to_model_input(self, image: torch.Tensor, call: dict) -> torch.Tensor:
        return image.transpose(1, 2)

    def capture_processor(self, guide: slice, backend: str, xformers: bool, threshold: float):
        return CogVideoXCaptureProcessor(guide, backend, xformers, threshold)

    def wrap_output(self, out):
        return Transformer2DModelOutput(sample=out)
