"""Perturbed-Attention Guidance (Ahn et al. 2024): the cond rows again, with the self-attention of
`pag_layers` replaced by the identity (every query attends only to its own key), and
`+ pag_scale * (o_cond - o_perturbed)`.

The perturbed attention is the family's (`Family.perturbed_attention`, sagfast.attention.identity):
diffusers' PAGIdentitySelfAttnProcessor2_0 on a UNet or DiT, PAGJointAttnProcessor2_0's on SD3.
diffusers' adaptive PAG (`pag_adaptive_scale`) lowers the scale as the timestep falls.
"""

from __future__ import annotations

import torch

from sagfast.core.settings import Setting, check_layers, interval, real, scale
from sagfast.terms.base import AttentionRule, Rows, Term


def adaptive(scale, fade: float, timestep: float):
    """diffusers' adaptive PAG: `max(scale - fade * (1000 - timestep), 0)`, per image where `scale` is a
    tuple."""
    if isinstance(scale, tuple):
        return tuple(adaptive(s, fade, timestep) for s in scale)
    return max(scale - fade * (1000 - timestep), 0.0)


class PAG(Term):
    name = "pag"
    order = 10
    settings = (
        scale(
            "pag_scale",
            (
                "Perturbed-Attention Guidance (Ahn et al. 2024) scale `s_pag` in `+ s_pag * (o_cond - o_perturbed)`: "
                "the perturbed pass runs the conditional rows with the self-attention of `pag_layers` replaced by the "
                "identity. 0 (the default) is off; diffusers' PAG pipelines default to 3.0. `scale=0, pag_scale=3.0` "
                "is PAG alone. Costs B more rows per step (in the main call, or the degraded one: `exact_pag_pass`). "
                "One number, or one per image (as `scale`)."
            ),
        ),
        Setting(
            "pag_layers",
            ("mid",),
            check_layers,
            (
                "Where PAG perturbs: diffusers' `pag_applied_layers` identifiers, matched against the names of the "
                "model's self-attention layers exactly as diffusers matches them (a regular-expression search in each "
                'name: "mid", "down_blocks.1", "up_blocks.0.attentions.0", "transformer_blocks.1"; note that '
                '"transformer_blocks.1" also finds "transformer_blocks.10", in diffusers too). A string is one '
                "identifier. Checked when a pipeline is enabled with pag_scale > 0."
            ),
        ),
        real(
            "pag_adaptive_scale",
            0.0,
            (
                "diffusers' adaptive PAG: the scale at timestep t is `max(pag_scale - pag_adaptive_scale * (1000 - "
                "t), 0)`, so PAG fades out as t falls (and its pass is skipped once the scale reaches 0). 0: "
                "constant."
            ),
            low=0.0,
        ),
        interval("pag_interval", ("Steps with PAG (as `cfg_interval`); outside it no perturbed rows are run.")),
    )
    scale_field = "pag_scale"
    interval_field = "pag_interval"
    layers_field = "pag_layers"
    source = "cond"

    def __init__(self, call):
        super().__init__(call)
        self.rule = AttentionRule.replacing(self.layers, call.family.perturbed_attention)

    def scale(self, timestep):
        if self.config.pag_adaptive_scale:
            # The first row's timestep as a Python number: a read-back where it is a device tensor.
            t = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
            return adaptive(self.config.pag_scale, self.config.pag_adaptive_scale, t)
        return self.config.pag_scale

    def rows(self, step) -> Rows:
        return Rows(step.sample[step.cond], step.cond, self.rule)
