"""CFG-Zero* (Fan et al. 2025, arXiv 2503.18886), as diffusers' ClassifierFreeZeroStarGuidance: the
uncond prediction scaled by `alpha = <o_c, o_u> / |o_u|^2` (per image, over all its values), then

    o = alpha * o_u + g * (o_c - alpha * o_u)

and, for the first `zero_init_steps` steps of the call, a zero prediction (the whole prediction:
the other terms too). Images with g <= 1 get o_c.
"""

from __future__ import annotations

from sagfast.core.settings import Setting, check_count
from sagfast.terms.cfg import CFGRule


class CFGZeroStar(CFGRule):
    name = "cfg_zero_star"
    needs_index = True
    settings = (Setting("zero_init_steps", 1, check_count, ("CFG-Zero*: the first `zero_init_steps` steps of the call predict zero.")),)

    def zero(self, index: int) -> bool:
        """Whether this step predicts zero."""
        return index < self.config.zero_init_steps

    def combine(self, o_u, o_c, g, index: int):
        flat_c, flat_u = o_c.flatten(1), o_u.flatten(1)
        alpha = (flat_c * flat_u).sum(1, keepdim=True) / ((flat_u**2).sum(1, keepdim=True) + 1e-8)
        scaled = o_u * alpha.view(-1, *([1] * (o_u.dim() - 1)))
        # g is 1 on the images without CFG: scaled + (o_c - scaled) = o_c.
        return scaled, [(g, o_c, scaled)]
