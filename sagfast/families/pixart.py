"""PixArt-alpha and PixArt-sigma: `pipe.transformer` a PixArtTransformer2DModel called on
`hidden_states` [B, C, H, W] with T5 `encoder_hidden_states`, its `encoder_attention_mask` and
`added_cond_kwargs`. CFG batches [uncond, cond], decided by the call's `guidance_scale > 1` (a local
of the pipeline's `__call__`, not a property). Learned sigma: 2 * in_channels out; SAG guides the first
in_channels.

Capture layer "mid": `attn1` (self-attention over the image tokens) of transformer_blocks[N // 2],
as for DiT. The map is the latent's (h, w) over the patch size.
"""

from __future__ import annotations

from diffusers.models.modeling_outputs import Transformer2DModelOutput

from sagfast.families.base import Family, transformer_block_layer


class PixArtFamily(Family):
    name = "PixArt"
    attribute = "transformer"
    pipelines = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    sample_argument = "hidden_states"

    def resolve_layer(self, model, layers: str):
        name, attn = transformer_block_layer(model, layers)
        original = getattr(model, "_orig_mod", model)
        return name, attn, original, original.config.patch_size

    def wrap_output(self, out):
        return Transformer2DModelOutput(sample=out)
