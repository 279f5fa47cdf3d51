"""DiT (DiTPipeline; the SAG paper's DiT experiments): `pipe.transformer` a DiTTransformer2DModel
called on `hidden_states` [B, C, H, W] with `class_labels`. CFG batches [cond, uncond] (the class
labels, then the null class 1000), decided by the call's `guidance_scale > 1`: the guide branch is
the second chunk. The output has 2 * in_channels with learned sigma: SAG guides the first
in_channels, the variance passes through.

Capture layer "mid": `attn1` of the block in the middle of the stack (transformer_blocks[N // 2]):
the paper reads a middle layer of the stack for DiT too, and it sees the image at the token grid
every block shares. The map is the latent's (h, w) over the patch size.
"""

from __future__ import annotations

from sagfast.families.base import PatchTransformerFamily


class DiTFamily(PatchTransformerFamily):
    name = "DiT"
    pipelines = ("DiTPipeline",)
    model_class = "DiTTransformer2DModel"

    def guide_chunk(self, chunks: int) -> int:
        return chunks - 1  # [cond, uncond]: the guide branch is uncond, the last chunk

    def cond_chunk(self, chunks: int) -> int:
        return 0


class DigitDiTFamily(PatchTransformerFamily):
    """The embedded digit transformer (`DigitDiTPipeline`, a DiTTransformer2DModel trained with flow
    matching): CFG batches [uncond, cond] like diffusers' text-to-image pipelines, with a
    `do_classifier_free_guidance` property; no learned sigma."""

    name = "digit DiT"
    pipelines = ("DigitDiTPipeline",)
    model_class = "DiTTransformer2DModel"
