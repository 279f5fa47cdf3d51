"""Magnitude-aware guidance (MAMBO-G, arXiv 2508.03442), as diffusers' MagnitudeAwareGuidance (its
default, non-original formulation): per image, the CFG scale shrinks where the update is large against
the uncond prediction,

    r = |o_c - o_u| / |o_u|,    g' = 1 + (g - 1) * exp(-mambo_alpha * r),    o = o_u + g' * (o_c - o_u)

|.| is the L2 norm of each image's prediction over all its values (every dimension but the batch).
diffusers 0.42.1 takes `torch.norm` over the dimensions 1..n-1 with its default Frobenius norm, which
is that L2 norm on 3-D predictions (packed [B, N, C]) and raises on 4-D and 5-D ones (latents [B, C, H,
W], video): sagfast computes that L2 norm for every layout. Images with g <= 1 get o_c.
"""

from __future__ import annotations

import torch

from sagfast.core.settings import real
from sagfast.terms.cfg import CFGRule, row_scale


class MAMBO(CFGRule):
    name = "mambo"
    settings = (
        real(
            "mambo_alpha",
            8.0,
            (
                'cfg_rule "mambo": how fast the CFG scale falls toward 1 as the update grows against the uncond '
                "prediction, `g' = 1 + (g - 1) * exp(-mambo_alpha * |o_c - o_u| / |o_u|)` per image (diffusers' "
                "MagnitudeAwareGuidance `alpha`). 0: plain CFG."
            ),
            low=0.0,
        ),
    )

    def combine(self, o_u, o_c, g, index: int):
        if not torch.is_tensor(g) and g <= 1:
            return o_c, []
        diff = o_c - o_u
        ratio = diff.flatten(1).norm(dim=1) / o_u.flatten(1).norm(dim=1)
        per_image = torch.is_tensor(g)
        if per_image:
            g = g.to(device=o_c.device, dtype=torch.float32)
        scale = 1.0 + (g - 1.0) * torch.exp(-self.config.mambo_alpha * ratio)  # [B]: one per image
        if not per_image:
            return o_u, [(scale, o_c, o_u)]
        # Images without CFG: base o_c and a term of scale 1 on o_c - o_c, exactly o_c.
        base = torch.where(row_scale(g, o_c) > 1, o_u, o_c)
        return base, [(scale, o_c, base)]
