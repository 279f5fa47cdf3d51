"""Perturbed-Attention Guidance (Ahn et al. 2024): the cond rows again, with the self-attention of
`pag_layers` replaced by the identity (every query attends only to its own key), and
`+ pag_scale * (o_cond - o_perturbed)`.

The perturbed attention is the family's (`Family.perturbed_attention`, sagfast.attention.identity):
diffusers' PAGIdentitySelfAttnProcessor2_0 on a UNet or DiT, PAGJointAttnProcessor2_0's on SD3.
diffusers' adaptive PAG (`pag_adaptive_scale`) lowers the scale as the timestep falls.
"""

from __future__ import annotations

import torch

from sagfast.terms.base import AttentionRule, Rows, Term


class PAG(Term):
    name = "pag"
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
            return self.config.pag_scale_at(t)
        return self.config.pag_scale

    def rows(self, step) -> Rows:
        return Rows(step.sample[step.cond], step.cond, self.rule)
