"""Frequency-decoupled guidance (FDG, Sadat et al. 2025, arXiv 2506.19713), as diffusers'
FrequencyDecoupledGuidance (its default, non-original formulation, data-space rescale): each image's
uncond and cond predictions are split into a Laplacian pyramid of L = len(fdg_scales) levels (the
highest frequencies first, the coarsest image last), CFG runs on each level with its own scale,

    o_l = u_l + w_l * d_l,   d_l = c_l - u_l   (with `fdg_parallel_weights`: d_l's part parallel to c_l
                                                  weighted by p_l, its orthogonal part kept)

and the pyramid is collapsed back (`x = pyrup(x) + o_l` from the coarsest level up). The pyramid is
kornia's (`build_laplacian_pyramid`, `pyrup`: the 5x5 binomial kernel [1, 4, 6, 4, 1]^2 / 256 with
reflected borders, bilinear resizes without aligned corners), written here in torch so that sagfast
does not need kornia. Predictions must be images [B, C, H, W].

The scales are `fdg_scales`, not the CFG scale: FDG has one scale per level and no single one. The CFG
scale (`cfg_scale`, else the call's `guidance_scale`) only says, per image, whether CFG is on (> 1:
FDG with `fdg_scales`) or off (<= 1: the cond prediction); its value is otherwise not used.

Sizes: kornia pads an image whose sides are not both fit for the pyramid to the next power of two,
and diffusers' guider then returns the padded size (its prediction no longer matches the latents).
sagfast pads only where a side is not a multiple of 2^(L-1), reflecting at the right and bottom to
the next multiple (kornia's `minimal_padding=True`, its announced default), and crops the result to
the latents' size; sizes that need no padding are computed exactly as diffusers does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sagfast.core.settings import Setting, _problem, _real, check_real
from sagfast.terms.cfg import CFGRule, row_scale

_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)


def check_fdg_scales(name: str, value) -> tuple:
    """A non-empty sequence of finite numbers (one per pyramid level), as a tuple of Python floats."""
    if isinstance(value, (list, tuple)) and value:
        parsed = [_real(v) for v in value]
        why = next((why for _, why in parsed if why is not None), None)
        if why is None:
            return tuple(v for v, _ in parsed), None
        return None, _problem(name, value, f"entries {why}")
    return None, _problem(name, value, "must be a non-empty sequence of finite numbers (one per pyramid level)")


def check_fdg_weights(name: str, value) -> tuple:
    """None, or a non-empty sequence of finite numbers (one per level of `fdg_scales`)."""
    if value is None:
        return None, None
    stored, problem = check_fdg_scales(name, value)
    return stored, (None if problem is None else f"{problem} (or None)")


def _blur(x: torch.Tensor) -> torch.Tensor:
    """kornia's `filter2d` with the pyramid kernel: reflect padding of 2, one 5x5 kernel per channel."""
    k = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device)
    kernel = (k[:, None] * k[None, :] / 256.0).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def pyrdown(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(_blur(x), size=(x.shape[2] // 2, x.shape[3] // 2), mode="bilinear", align_corners=False)


def pyrup(x: torch.Tensor) -> torch.Tensor:
    return _blur(F.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2), mode="bilinear", align_corners=False))


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """kornia's `build_laplacian_pyramid(x, levels)` on an image whose sides are multiples of 2^(levels-1)."""
    gaussian = [x]
    for _ in range(levels - 1):
        gaussian.append(pyrdown(gaussian[-1]))
    return [gaussian[i] - pyrup(gaussian[i + 1]) for i in range(levels - 1)] + [gaussian[-1]]


def collapse(pyramid: list[torch.Tensor]) -> torch.Tensor:
    """diffusers' `build_image_from_pyramid`."""
    x = pyramid[-1]
    for level in reversed(pyramid[:-1]):
        x = pyrup(x) + level
    return x


def _rescale(pred: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """diffusers' `rescale_noise_cfg`: pred's std per image matched to cond's, mixed by phi."""
    dims = list(range(1, pred.dim()))
    rescaled = pred * (cond.std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * pred


class FDG(CFGRule):
    name = "fdg"
    settings = (
        Setting(
            "fdg_scales",
            (10.0, 5.0),
            check_fdg_scales,
            (
                'cfg_rule "fdg": the CFG scale of each Laplacian pyramid level, highest frequencies first (diffusers\' '
                "FrequencyDecoupledGuidance `guidance_scales`; the paper suggests (10, 5) for SDXL); its length is the "
                "number of levels. They replace the CFG scale: `cfg_scale` (or the call's `guidance_scale`) only turns "
                "CFG on (> 1) or off (<= 1) per image."
            ),
        ),
        Setting(
            "fdg_parallel_weights",
            None,
            check_fdg_weights,
            (
                'cfg_rule "fdg": per level, the weight of the update\'s part parallel to the cond prediction (its '
                "orthogonal part kept), one per entry of `fdg_scales` (diffusers' `parallel_weights`; [0, 1] "
                "recommended). None: 1 on every level, plain CFG per level."
            ),
        ),
        Setting(
            "fdg_guidance_rescale",
            0.0,
            lambda name, value: check_real(name, value, low=0.0, high=1.0),
            (
                'cfg_rule "fdg": diffusers\' `guidance_rescale` of FrequencyDecoupledGuidance, in data space (its '
                "default): the collapsed prediction's std per image matched to the cond prediction's, mixed by this "
                "factor (Lin et al. 2023). 0: off."
            ),
        ),
    )

    def __init__(self, config):
        super().__init__(config)
        levels = len(config.fdg_scales)
        weights = config.fdg_parallel_weights
        if weights is not None and len(weights) != levels:
            raise ValueError(
                f"fdg_parallel_weights has {len(weights)} entries and fdg_scales {levels}: give one weight per level, "
                f"got fdg_parallel_weights={weights!r}, fdg_scales={config.fdg_scales!r}"
            )
        self.weights = weights or (1.0,) * levels

    def guided(self, o_u: torch.Tensor, o_c: torch.Tensor) -> torch.Tensor:
        """Every image's FDG prediction."""
        if o_c.dim() != 4:
            raise ValueError(
                f'cfg_rule "fdg" splits each prediction into a Laplacian pyramid of images [B, C, H, W]; this model '
                f"predicts {tuple(o_c.shape)}"
            )
        levels = len(self.config.fdg_scales)
        h, w = o_c.shape[2:]
        stride = 1 << (levels - 1)
        pad = (0, -w % stride, 0, -h % stride)
        if min(h + pad[3], w + pad[1]) // stride < 3:
            raise ValueError(
                f'cfg_rule "fdg" with {levels} levels needs predictions of at least {3 * stride} x {3 * stride} (its '
                f"coarsest level is blurred with reflected borders of 2), got {h} x {w}: use fewer fdg_scales"
            )
        c, u = (F.pad(x, pad, mode="reflect") if any(pad) else x for x in (o_c, o_u))
        pyramid = []
        for scale, weight, c_l, u_l in zip(
            self.config.fdg_scales, self.weights, laplacian_pyramid(c, levels), laplacian_pyramid(u, levels)
        ):
            shift = c_l - u_l
            if not math.isclose(weight, 1.0):
                # As diffusers' `project`: float64, the shift's part parallel to c_l scaled by the weight.
                dims = list(range(1, shift.dim()))
                v0, v1 = shift.double(), F.normalize(c_l.double(), dim=dims)
                parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
                shift = weight * parallel.to(shift.dtype) + (v0 - parallel).to(shift.dtype)
            # A level whose scale is 1 is its cond level (diffusers leaves it out of the update).
            pyramid.append(c_l if math.isclose(scale, 1.0) else u_l + scale * shift)
        out = collapse(pyramid)[:, :, :h, :w]
        if self.config.fdg_guidance_rescale > 0:
            out = _rescale(out, o_c, self.config.fdg_guidance_rescale)
        return out

    def combine(self, o_u, o_c, g, index: int):
        if not torch.is_tensor(g):
            return (self.guided(o_u, o_c) if g > 1 else o_c), []
        return torch.where(row_scale(g, o_c) > 1, self.guided(o_u, o_c), o_c), []
