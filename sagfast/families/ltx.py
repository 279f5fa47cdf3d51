"""LTX-Video (LTXPipeline): `pipe.transformer` an LTXVideoTransformer3DModel called on packed tokens
`hidden_states` [B, F * H * W, C] (frame, row, column order; patch sizes 1, as every LTX-Video
checkpoint) with the latent grid in `num_frames`, `height`, `width`, and its 3-D rotary embedding
computed inside. CFG batches [uncond, cond], decided by the pipeline's `do_classifier_free_guidance`;
a flow-matching schedule (the model predicts the velocity; sigma from the scheduler).

Capture layer "mid": `attn1` (self-attention over the video tokens, RoPE on q and k) of
transformer_blocks[N // 2]; the map is the token grid (F, H, W) the call names. Blur and mask act on
the unpacked latent [B, C, F, H, W], per frame; the degraded latent is packed back.

PAG (value attention on `attn1`) and STG run; SEG is refused (its query blur is 2-D).
"""

from __future__ import annotations

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from sagfast.attention.identity import value_attention
from sagfast.attention.processors import SAGCaptureProcessor
from sagfast.families.base import Family, transformer_block_layer


class LTXCaptureProcessor(SAGCaptureProcessor):
    """LTXVideoAttnProcessor on a self-attention layer that also records the attention mass of the guide
    rows (SDPA with its default scale, as the stock processor; no attention mask)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, *args, **kwargs):
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("SAG's LTX capture layer must be a self-attention layer without an attention mask (attn1)")
        query, key = attn.norm_q(attn.to_q(hidden_states)), attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query, key = apply_rotary_emb(query, image_rotary_emb), apply_rotary_emb(key, image_rotary_emb)
        q, k, v = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (query, key, value))  # [B, H, N, D]
        return attn.to_out[1](attn.to_out[0](self.attend(q, k, v)))


class LTXFamily(Family):
    name = "LTX-Video"
    attribute = "transformer"
    model_class = "LTXVideoTransformer3DModel"
    pipelines = ("LTXPipeline",)
    sample_argument = "hidden_states"
    token_grid = "thw"
    blocks = "transformer_blocks"

    def problems(self, pipe) -> list[str]:
        found = super().problems(pipe)
        config = getattr(getattr(pipe, "transformer", None), "config", None)
        if not found and (config.patch_size, config.patch_size_t) != (1, 1):
            found.append(
                f"its transformer patches tokens by {config.patch_size_t}x{config.patch_size}x{config.patch_size}; sagfast knows LTX-Video's 1x1x1"
            )
        return found

    perturbed_attention = staticmethod(value_attention)

    def resolve_layer(self, model, layers: str):
        name, attn = transformer_block_layer(model, layers, module_class="LTXAttention")
        return name, attn, getattr(model, "_orig_mod", model), 1  # the call names the grid (map_size)

    def map_size(self, call: dict):
        return (int(call["num_frames"]), int(call["height"]), int(call["width"]))

    def to_image(self, x: torch.Tensor, call: dict) -> torch.Tensor:
        f, h, w = self.map_size(call)
        return x.reshape(x.shape[0], f, h, w, x.shape[-1]).permute(0, 4, 1, 2, 3)  # [B, C, F, H, W]

    def to_model_input(self, image: torch.Tensor, call: dict) -> torch.Tensor:
        return image.permute(0, 2, 3, 4, 1).flatten(1, 3)

    def capture_processor(self, guide: slice, backend: str, xformers: bool, threshold: float):
        return LTXCaptureProcessor(guide, backend, xformers, threshold)

    def wrap_output(self, out):
        return Transformer2DModelOutput(sample=out)
