"""Unconditional pixel- or latent-space UNets: DDPMPipeline, DDIMPipeline (and LDM's
LDMPipeline), `pipe.unet` a UNet2DModel called on the samples alone: no CFG, the guide branch is the
batch itself. This is the ADM-like setting in which the SAG paper reports its main gains.

Capture layer "mid": the mid block's first attention (`mid_block.attentions.0`), a self-attention
on the 4-D feature map: the map's (h, w) is its own input's.
"""

from __future__ import annotations

from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d import UNet2DOutput

from sagfast.families.base import Family, layer_error

MID_LAYER = "mid_block.attentions.0"


class UnconditionalUNetFamily(Family):
    name = "unconditional UNet"
    attribute = "unet"
    model_class = "UNet2DModel"
    pipelines = ("DDPMPipeline", "DDIMPipeline", "LDMPipeline")

    def cfg_chunks(self, pipe, arguments: dict) -> int:
        return 1

    def resolve_layer(self, model, layers: str):
        model = getattr(model, "_orig_mod", model)
        name = MID_LAYER if layers == "mid" else layers
        attn = dict(model.named_modules()).get(name)
        if not isinstance(attn, Attention) or attn.is_cross_attention:
            raise layer_error(model, "the mid block's attention" if layers == "mid" else repr(name), name)
        return name, attn, attn, 1

    def wrap_output(self, out):
        return UNet2DOutput(sample=out)
