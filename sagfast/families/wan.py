"""Wan 2.1 (WanPipeline): `pipe.transformer` a WanTransformer3DModel called on `hidden_states`
[B, C, F, H, W] with `encoder_hidden_states` and `timestep`; patch (1, 2, 2), tokens in (frame, row,
column) order, a 3-D rotary embedding computed inside. A flow-matching schedule (UniPC or Euler with
flow sigmas): the model predicts the velocity.

Capture layer "mid": `attn1` (self-attention over the video tokens, RMS norm on q and k, RoPE) of
blocks[N // 2]; the map is the layer's true (t, h, w) grid, the 5-D input's (F, H, W) over the patch.

CFG: WanPipeline runs it as two sequential transformer calls per step (cond, then uncond), not a
[uncond, cond] batch. sagfast joins them (`GuidedCall.sequential_step`): the cond call runs the step
as one [uncond, cond] batch, with the uncond inputs of the previous step's uncond call, and the uncond
call returns the uncond half it kept (after checking that its inputs are those). The first step has
no uncond inputs yet: its cond call runs as it is, its uncond call runs the joined step, and the
uncond half it returns is corrected so that the pipeline's CFG line gives the joined step's
prediction exactly. Per step after the first: exact mode 2 calls (2B, then B degraded), batched mode
1 call (3B). Without CFG the cond branch is guided.

Wan 2.2: `transformer_2` (the low-noise stage, below `boundary_ratio`) gets its own guided call (its
capture and terms), sharing the joined calls' state; its calls combine with `guidance_scale_2`.
WanImageToVideoPipeline: the image latents ride in the input's extra channels and the CLIP image
embeddings in `encoder_hidden_states_image`: the degraded rows keep the guide rows' own. Wan 2.2 TI2V's
per-token timesteps (`expand_timesteps`) are refused. PAG (value attention on `attn1`) and STG run;
SEG is refused.
"""

from __future__ import annotations

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from sagfast.attention.identity import value_attention
from sagfast.attention.processors import SAGCaptureProcessor
from sagfast.families.base import Family, transformer_block_layer


def wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """WanAttnProcessor's rotary embedding on [B, N, H, D] (interleaved pairs)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class WanCaptureProcessor(SAGCaptureProcessor):
    """WanAttnProcessor on a self-attention layer (attn1) that also records the attention mass of the
    guide rows (SDPA with its default scale, as the stock processor)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("SAG's Wan capture layer must be a self-attention layer without an attention mask (attn1)")
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = wan_rotary(query, *rotary_emb), wan_rotary(key, *rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, N, D]
        return attn.to_out[1](attn.to_out[0](self.attend(q, k, v)))


class WanFamily(Family):
    name = "Wan"
    attribute = "transformer"
    model_class = "WanTransformer3DModel"
    attributes = ("transformer", "transformer_2")
    pipelines = ("WanPipeline", "WanImageToVideoPipeline")
    sample_argument = "hidden_states"
    token_grid = "thw"
    blocks = "blocks"

    def problems(self, pipe) -> list[str]:
        found = super().problems(pipe)
        second = getattr(pipe, "transformer_2", None)
        if second is not None and self.model_class not in {c.__name__ for c in type(getattr(second, "_orig_mod", second)).__mro__}:
            found.append(f"its `transformer_2` is a {type(second).__name__}, not a {self.model_class}")
        if getattr(pipe.config, "expand_timesteps", False):
            found.append(
                "it denoises with a timestep per token (expand_timesteps: Wan 2.2 TI2V's first frame kept clean), "
                "which SAG's re-noising at one noise level per image does not follow yet"
            )
        return found

    def cfg_chunks(self, pipe, arguments: dict) -> int:
        return 1  # each model call is one branch

    def sequential_cfg(self, pipe, attribute: str, arguments: dict):
        """Wan's CFG: two calls per step, cond then uncond, combined with the call's guidance_scale
        (Wan 2.2's low-noise transformer_2: guidance_scale_2)."""
        if not pipe.do_classifier_free_guidance:
            return None
        return float(pipe._guidance_scale_2 if attribute == "transformer_2" else pipe.guidance_scale)

    perturbed_attention = staticmethod(value_attention)

    def resolve_layer(self, model, layers: str):
        name, attn = transformer_block_layer(model, layers, stack="blocks", module_class="WanAttention")
        original = getattr(model, "_orig_mod", model)
        pt, ph, pw = original.config.patch_size
        if ph != pw:
            raise ValueError(f"sagfast's map needs a square spatial patch; this WanTransformer3DModel patches {ph}x{pw}")
        # The input is [B, C, F, H, W]: frames on axis 2.
        return name, attn, original, (2, pt, ph)

    def capture_processor(self, guide: slice, backend: str, xformers: bool, threshold: float):
        return WanCaptureProcessor(guide, backend, xformers, threshold)

    def wrap_output(self, out):
        return Transformer2DModelOutput(sample=out)
