"""Adaptive projected guidance (Sadat et al. 2024, arXiv 2410.02416), as diffusers'
AdaptiveProjectedGuidance: the CFG update `d = o_c - o_u` (with momentum: a running sum
`d + momentum * previous`), its L2 norm per image capped at `apg_rescale`, split into the parts
parallel and orthogonal to o_c, and

    o = o_u + g * (d_orthogonal + apg_eta * d_parallel)

The projection is computed in float64, as diffusers computes it. Images with g <= 1 get o_c.
"""

from __future__ import annotations

import torch

from sagfast.core.settings import Setting, check_optional_real, real
from sagfast.terms.cfg import CFGRule, row_scale


class APG(CFGRule):
    name = "apg"
    settings = (
        Setting(
            "apg_momentum",
            None,
            check_optional_real,
            (
                "APG's momentum on the update (diffusers' `adaptive_projected_guidance_momentum`; the paper uses "
                "-0.5). None or 0: no momentum."
            ),
        ),
        real("apg_rescale", 15.0, ("APG's norm threshold: the update's L2 norm (per image) is capped at this. 0: no cap."), low=0.0),
        real(
            "apg_eta",
            1.0,
            (
                "APG's weight of the update's component parallel to the conditional prediction (0 drops it, the "
                "paper's choice; 1 keeps it, diffusers' default)."
            ),
        ),
    )

    def __init__(self, config):
        super().__init__(config)
        self.running = None
        """The momentum's running average of the update, per image, over the call's steps."""

    def combine(self, o_u, o_c, g, index: int):
        cfg = self.config
        dims = list(range(1, o_c.dim()))
        diff = o_c - o_u
        if cfg.apg_momentum is not None:
            self.running = diff if self.running is None else diff + cfg.apg_momentum * self.running
            diff = self.running
        if cfg.apg_rescale > 0:
            norm = diff.norm(p=2, dim=dims, keepdim=True)
            diff = diff * torch.minimum(torch.ones_like(norm), cfg.apg_rescale / norm)
        v0, v1 = diff.double(), torch.nn.functional.normalize(o_c.double(), dim=dims)
        parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
        update = (v0 - parallel).to(diff.dtype) + cfg.apg_eta * parallel.to(diff.dtype)
        if not torch.is_tensor(g):
            return (o_u + g * update if g > 1 else o_c), []
        scale = row_scale(g, o_c)
        return torch.where(scale > 1, o_u + scale * update, o_c), []

    def graph_refusals(self) -> list[str]:
        return ["APG's momentum is a running average kept between steps"] if self.config.apg_momentum is not None else []
