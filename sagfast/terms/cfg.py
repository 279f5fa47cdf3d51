"""Classifier-free guidance as a rule: how each image's uncond and cond predictions become its guided
one when sagfast computes it (`SAGConfig.cfg_scale` given, or a `cfg_rule` other than "cfg").

A rule returns a base prediction and the (scale, positive, negative) terms to add to it; the engine
adds the other terms' (SAG, PAG, SEG) and runs them all as one combine. Plain CFG is
`o_u + g * (o_c - o_u)`: base o_u, one term. An image whose scale is <= 1 is guided without CFG: its
prediction is its cond row (a scale of exactly 1 on the term gives it).

With the pipeline's own CFG line (cfg_scale None, cfg_rule "cfg") no rule runs: the engine returns
`o[k] + terms` for both CFG halves and the pipeline applies its guidance_scale.
"""

from __future__ import annotations

import torch


def row_scale(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-image scale [B] as fp32 [B, 1, ...] against `like`'s rows."""
    g = g.to(device=like.device, dtype=torch.float32)
    return g.reshape(-1, *([1] * (like.dim() - 1))).expand(like.shape[0], *([1] * (like.dim() - 1)))


class CFGRule:
    """The interface (and plain CFG). Made per guided call: a rule may keep state between steps."""

    name = "cfg"

    def __init__(self, config):
        self.config = config

    def combine(self, o_u: torch.Tensor, o_c: torch.Tensor, g, index: int):
        """(base, terms) for fp32 predictions [B, ...] and the CFG scale `g` (a number or a [B] fp32
        tensor with 1 for every image guided without CFG); `index`: the step of the call."""
        return o_u, [(g, o_c, o_u)]

    def zero(self, index: int) -> bool:
        """Whether step `index` predicts zero (CFG-Zero*'s first steps)."""
        return False

    def graph_refusals(self) -> list[str]:
        return []
