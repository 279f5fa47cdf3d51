"""PixArt-alpha and PixArt-sigma: `pipe.transformer` a PixArtTransformer2DModel called on
`hidden_states` [B, C, H, W] with T5 `encoder_hidden_states`, its `encoder_attention_mask` and
`added_cond_kwargs`. CFG batches [uncond, cond], decided by the call's `guidance_scale > 1` (a local
of the pipeline's `__call__`, not a property). Learned sigma: 2 * in_channels out; SAG guides the first
in_channels.

Capture layer "mid": `attn1` (self-attention over the image tokens) of transformer_blocks[N // 2],
as for DiT. The map is the latent's (h, w) over the patch size.
"""

from __future__ import annotations

from sagfast.families.base import PatchTransformerFamily


class PixArtFamily(PatchTransformerFamily):
    name = "PixArt"
    pipelines = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    model_class = "PixArtTransformer2DModel"
