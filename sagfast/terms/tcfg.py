"""Tangential classifier-free guidance (TCFG, Kwon et al. 2025, arXiv 2503.18137), as diffusers'
TangentialClassifierFreeGuidance (its default, non-original formulation): per image, the uncond
prediction is replaced by its projection on the first right singular vector v1 of the 2 x N matrix
[o_c; o_u] (each prediction flattened), dropping its component along the second one, then

    o = P(o_u) + g * (o_c - P(o_u)),    P(o_u) = <o_u, v1> v1

diffusers gets v1 from an SVD; here it comes in closed form from the 2 x 2 Gram matrix of the two rows,
in float64: v1 = (e1 o_c + e2 o_u) / sqrt(l1), with (e1, e2) the unit eigenvector of the Gram matrix's
largest eigenvalue l1. The same vector (up to its sign, which the projection does not see) without a
batched SVD: no solver that checks its convergence on the host, so a step stays capturable in a CUDA
graph. The same extra settings as CFG's: none. Images with g <= 1 get o_c.
"""

from __future__ import annotations

import torch

from sagfast.terms.cfg import CFGRule, row_scale


def tangential_uncond(o_u: torch.Tensor, o_c: torch.Tensor) -> torch.Tensor:
    """P(o_u): o_u's projection on the first right singular vector of [o_c; o_u], per image."""
    c, u = o_c.flatten(1).double(), o_u.flatten(1).double()
    cc, uu, cu = (c * c).sum(1), (u * u).sum(1), (c * u).sum(1)
    # The Gram matrix [[cc, cu], [cu, uu]]'s largest eigenvalue and its eigenvector, taken from the
    # row whose diagonal entry is the smaller (its entries are then not a difference of near-equal numbers).
    half = 0.5 * (cc - uu)
    top = 0.5 * (cc + uu) + torch.sqrt(half * half + cu * cu)
    e1 = torch.where(cc >= uu, top - uu, cu)
    e2 = torch.where(cc >= uu, cu, top - cc)
    length = torch.sqrt(e1 * e1 + e2 * e2)
    # Equal norms and orthogonal rows (a double eigenvalue): any unit vector of the plane is a first
    # singular vector; take o_c's direction. All-zero predictions project to zero.
    flat = length == 0
    e1, e2 = torch.where(flat, 1.0, e1 / length.clamp_min(1e-300)), torch.where(flat, 0.0, e2 / length.clamp_min(1e-300))
    # <o_u, v1> v1 with v1 = (e1 c + e2 u) / sqrt(top): coefficients of c and u.
    k = (e1 * cu + e2 * uu) / top.clamp_min(1e-300)
    shape = (-1, *([1] * (o_u.dim() - 1)))
    a, b = (k * e1).float().view(shape), (k * e2).float().view(shape)
    return a * o_c + b * o_u


class TCFG(CFGRule):
    name = "tcfg"
    settings = ()

    def combine(self, o_u, o_c, g, index: int):
        base = tangential_uncond(o_u, o_c)
        if not torch.is_tensor(g):
            return (base, [(g, o_c, base)]) if g > 1 else (o_c, [])
        # Images without CFG: base o_c and a zero term, exactly o_c.
        base = torch.where(row_scale(g, o_c) > 1, base, o_c)
        return base, [(g, o_c, base)]
