"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline): `pipe.transformer` an SD3Transformer2DModel
called on `hidden_states` [B, C, H, W] with `encoder_hidden_states`, `pooled_projections` and
`timestep`. CFG batches [uncond, cond], decided by the pipeline's `do_classifier_free_guidance`. A
flow-matching schedule (FlowMatchEulerDiscreteScheduler): the model predicts the velocity, and the
step's sigma is read from the scheduler (the pipeline hands the transformer the scheduler's own
timestep, so a plain lookup finds it).

Capture layer "mid": the joint attention `attn` of transformer_blocks[N // 2]. Its processor runs
image tokens and text tokens ([image, text]) through one softmax; the capture processor
(sagfast.attention.processors.JointCaptureProcessor) takes the mass of the IMAGE keys received from the IMAGE
queries, each query's softmax over all keys, from that one SDPA call's log-sum-exp. The map is the
latent's (h, w) over the patch size.

PAG perturbs the joint attention as diffusers' SD3 PAG pipeline does: an image query attends to its
own image key and the text keys (sagfast.attention.identity.joint_identity_attention).

Skip-layer guidance (`skip_guidance_layers`) adds model calls on the cond rows alone in the middle
of the CFG batch layout: refused.
"""

from __future__ import annotations

from diffusers.models.modeling_outputs import Transformer2DModelOutput

from sagfast.attention.identity import joint_identity_attention
from sagfast.attention.processors import JointCaptureProcessor
from sagfast.families.base import Family, transformer_block_layer


class SD3Family(Family):
    name = "Stable Diffusion 3"
    attribute = "transformer"
    model_class = "SD3Transformer2DModel"
    pipelines = ("StableDiffusion3Pipeline",)
    sample_argument = "hidden_states"
    perturbed_attention = staticmethod(joint_identity_attention)

    def cfg_chunks(self, pipe, arguments: dict) -> int:
        if arguments.get("skip_guidance_layers") is not None:
            raise ValueError(
                "sagfast does not guide StableDiffusion3Pipeline with skip_guidance_layers: skip-layer guidance "
                "makes extra transformer calls on the cond rows alone, outside the [uncond, cond] batch layout "
                "SAG reads its guide rows from. Call without skip_guidance_layers, or disable SAG."
            )
        return super().cfg_chunks(pipe, arguments)

    def resolve_layer(self, model, layers: str):
        name, attn = transformer_block_layer(model, layers, attention="attn")
        original = getattr(model, "_orig_mod", model)
        return name, attn, original, original.config.patch_size

    def capture_processor(self, guide: slice, backend: str, xformers: bool, threshold: float):
        return JointCaptureProcessor(guide, backend, xformers, threshold)

    def wrap_output(self, out):
        return Transformer2DModelOutput(sample=out)
