"""Spatiotemporal Skip Guidance (Hyung et al. 2024, arXiv 2411.18664): the cond rows again with chosen
transformer blocks skipped, and `+ stg_scale * (o_cond - o_skipped)`.

Two modes, as the paper's STG-R and STG-A:

- "block" (STG-R, what diffusers' community STG pipelines run, and diffusers' `LayerSkipConfig` with
  `skip_attention` and `skip_ff`): each block of `stg_layers` hands the perturbed rows their inputs
  back, for every stream it returns (video and text tokens);
- "attention" (STG-A, as the STG authors' LTX-Video processor, LTX-2's perturbed attention and
  `LayerSkipConfig(skip_attention_scores=True)`): the self-attention of those blocks returns the
  value projection, each token attending only to itself: PAG's perturbation
  (`Family.perturbed_attention`) on the blocks' self-attention, the rest of the blocks as they are.

The community pipelines put the skipped rows in the [uncond, cond, perturbed] batch of one call (so
does sagfast, in both modes) and guide every step; `stg_interval` limits the steps as every term's
interval does. Their optional std rescale (`do_rescaling`) is not part of STG's formula and is not
offered.
"""

from __future__ import annotations

from sagfast.core.settings import Setting, check_blocks, choice, interval, scale
from sagfast.terms.base import AttentionRule, Rows, SkipRule, Term


class STG(Term):
    name = "stg"
    order = 30
    settings = (
        scale(
            "stg_scale",
            (
                "Spatiotemporal Skip Guidance (Hyung et al. 2024) scale in `+ s_stg * (o_cond - o_skipped)`: the "
                "conditional rows again with the blocks `stg_layers` skipped (`stg_mode`). 0 (the default) is off, as "
                "in diffusers' community STG pipelines (their examples use 1.0). On the families with a transformer "
                "block stack (the video families). B more rows per step. One number, or one per image."
            ),
        ),
        Setting(
            "stg_layers",
            ("mid",),
            check_blocks,
            (
                "Which blocks STG skips: block indices (as the STG pipelines' `stg_applied_layers_idx`, e.g. [8]), "
                '"mid" (the middle block) or block names ("blocks.8", "transformer_blocks.19"). Checked when a '
                "pipeline is enabled with stg_scale > 0."
            ),
        ),
        choice(
            "stg_mode",
            "block",
            ("block", "attention"),
            (
                "\"block\" (the paper's STG-R, diffusers' community STG pipelines): the skipped rows get each block's "
                'inputs back as its outputs. "attention" (STG-A): only the blocks\' self-attention is skipped, each '
                "token attending to itself alone (PAG's perturbation on those blocks); the rest of the block runs."
            ),
        ),
        interval("stg_interval", ("Steps with STG (as `cfg_interval`; the community pipelines guide every step).")),
    )
    scale_field = "stg_scale"
    interval_field = "stg_interval"
    layers_field = "stg_layers"
    layers_kind = "block"
    source = "cond"

    def __init__(self, call):
        super().__init__(call)
        family = call.family
        if self.config.stg_mode == "block":
            self.rule = SkipRule(self.layers, family.block_outputs)
        else:
            self.rule = AttentionRule.replacing(self.layers, family.perturbed_attention)

    @classmethod
    def unsupported(cls, family) -> str | None:
        if family.blocks is None:
            return "STG skips transformer blocks, and sagfast knows no block stack in its model (PAG perturbs the self-attention of chosen layers on every family)"
        return super().unsupported(family)

    @classmethod
    def layers_of(cls, family, model, config) -> list:
        blocks = family.skipped_blocks(model, config.stg_layers, cls.layers_field)
        return blocks if config.stg_mode == "block" else [family.self_attention_of(block) for block in blocks]

    def rows(self, step) -> Rows:
        return Rows(step.sample[step.cond], step.cond, self.rule)
