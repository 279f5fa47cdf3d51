"""Stable Diffusion 1.x/2.x and SDXL (text-to-image, img2img, inpaint, ControlNet) and the digit
pipeline: `pipe.unet`, a UNet2DConditionModel called on [uncond, cond] under CFG.

Capture layer "mid": the first self-attention (`attn1`) of the mid block's first transformer block,
as in the SAG paper and diffusers' SAG pipeline; the map's (h, w) is the 4-D input of the
Transformer2DModel that holds it.

Transformer blocks (`transformer_blocks`, for terms that change a block's input): the
BasicTransformerBlocks inside the down, mid and up blocks' Transformer2DModels, in that order (the
forward's); "mid" is the middle one of the mid block's (its first on SD 1.x/2.x, where the mid block
has one; the 6th of SDXL's 10), else the middle of them all.
"""

from __future__ import annotations

import re

from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from sagfast.families.base import Family, layer_error

MID_LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1"

TRANSFORMER_BLOCK = re.compile(r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\.transformer_blocks\.\d+")
"""The name of a transformer block in a UNet: the blocks of a down, mid or up block's Transformer2DModel."""

SECTIONS = ("down_blocks", "mid_block", "up_blocks")


class UNetFamily(Family):
    name = "Stable Diffusion UNet"
    attribute = "unet"
    model_class = "UNet2DConditionModel"
    pipelines = (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
        "StableDiffusionControlNetPipeline",
        "StableDiffusionControlNetImg2ImgPipeline",
        "StableDiffusionControlNetInpaintPipeline",
        "StableDiffusionXLControlNetPipeline",
        "StableDiffusionXLControlNetImg2ImgPipeline",
        "StableDiffusionXLControlNetInpaintPipeline",
        "DigitDiffusionPipeline",
    )

    def resolve_layer(self, model, layers: str):
        model = getattr(model, "_orig_mod", model)
        name = MID_LAYER if layers == "mid" else layers
        modules = dict(model.named_modules())
        attn = modules.get(name)
        if not isinstance(attn, Attention) or attn.is_cross_attention:
            raise layer_error(model, "the first self-attention of the mid block" if layers == "mid" else repr(name), name)
        parts = name.split(".")
        owners = [modules[".".join(parts[:i])] for i in range(len(parts) - 1, 0, -1)]
        owner = next((m for m in owners if type(m).__name__ == "Transformer2DModel"), attn)
        return name, attn, owner, 1

    def transformer_blocks(self, model) -> dict:
        model = getattr(model, "_orig_mod", model)
        blocks = [(name, module) for name, module in model.named_modules() if TRANSFORMER_BLOCK.fullmatch(name)]
        # named_modules follows registration (down, up, then mid); the forward runs down, mid, up.
        blocks.sort(key=lambda item: SECTIONS.index(item[0].split(".")[0]))
        return dict(blocks)

    def middle_block(self, model) -> str | None:
        names = list(self.transformer_blocks(model))
        mid = [name for name in names if name.startswith("mid_block.")]
        chosen = mid or names
        return chosen[len(chosen) // 2] if chosen else None

    def wrap_output(self, out):
        return UNet2DConditionOutput(sample=out)
