"""Smoothed Energy Guidance (Hong 2024, arXiv 2408.00760): the cond rows again, with the queries of
`seg_layers` blurred by a Gaussian over the layer's (h, w) token grid, and
`+ seg_scale * (o_cond - o_smoothed)`.

Blurring the queries blurs the attention weights (softmax of q k^T): it lowers the curvature of the
attention's energy landscape. At `seg_blur_sigma >= 9999` (diffusers' `seg_blur_threshold_inf`) the
blur is infinite: every query is the mean query of its image, so every token attends with the same
weights. The blur acts on the output of the layer's `to_q` (as diffusers' SEG hook does), on the
image tokens only (SD3's joint attention projects its text tokens with `add_q_proj`, untouched), on
the layer's true grid: a UNet level at `ceil(H / 2^k) x ceil(W / 2^k)` of the latent (each
downsampler halves it, rounding up), a patch transformer at (H / p, W / p). diffusers' guider reshapes
to a square of side floor(sqrt(N)) instead, so on a non-square image it blurs the wrong neighbours.

The kernel is the SEG reference's (SusungHong/SEG-SDXL): size `ceil(6 sigma) + 1` made odd, cut to
the grid per axis as the reference cuts it, reflect padding; separable, so a (kh x kw) window is
two 1-D passes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sagfast.core.settings import Setting, check_layers, interval, real, scale
from sagfast.terms.base import AttentionRule, Rows, Term

INFINITE_BLUR = 9999.0
"""At or above this sigma the blur is infinite (diffusers' `seg_blur_threshold_inf`)."""


def token_grid(image_hw: tuple, n: int) -> tuple[int, int]:
    """(h, w) of a layer's n image tokens for a latent image of `image_hw`: the level k at which
    `ceil(H / 2^k) * ceil(W / 2^k) == n` (a UNet's k-th resolution, a patch-2^k transformer)."""
    height, width = image_hw
    for k in range(9):
        h, w = -(-height // 2**k), -(-width // 2**k)
        if h * w == n:
            return h, w
    raise ValueError(
        f"SEG cannot lay {n} query tokens on the latent's {height}x{width} grid at any level (1/2^k, k <= 8); "
        "choose seg_layers whose tokens are image tokens only"
    )


def _kernel_1d(sigma: float, side: int, device) -> torch.Tensor:
    size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    size = min(size, side - (side % 2 - 1))  # the reference's cut: at most side (odd), or side + 1 (even)
    half = (size - 1) / 2
    x = torch.linspace(-half, half, steps=size, device=device, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).float()


def blur_queries(q: torch.Tensor, h: int, w: int, sigma: float) -> torch.Tensor:
    """Queries [B, h * w, C] (row-major tokens) blurred over the (h, w) grid, per channel: the mean
    query where the blur is infinite. Computed in fp32, returned in q's dtype."""
    if sigma >= INFINITE_BLUR:
        return q.float().mean(dim=1, keepdim=True).expand_as(q).to(q.dtype)
    b, n, c = q.shape
    grid = q.float().transpose(1, 2).reshape(b * c, 1, h, w)
    ky, kx = _kernel_1d(sigma, h, q.device), _kernel_1d(sigma, w, q.device)
    grid = F.conv2d(F.pad(grid, (0, 0, len(ky) // 2, len(ky) // 2), mode="reflect"), ky.view(1, 1, -1, 1))
    grid = F.conv2d(F.pad(grid, (len(kx) // 2, len(kx) // 2, 0, 0), mode="reflect"), kx.view(1, 1, 1, -1))
    return grid.reshape(b, c, n).transpose(1, 2).to(q.dtype)


class SmoothedQueries:
    """An attention layer as its own processor sees it, with the output of `to_q` blurred by `blur`
    (everything else is the layer's: its processor runs unchanged)."""

    def __init__(self, attn, blur):
        self.__dict__["attn"] = attn
        self.__dict__["blur"] = blur

    def to_q(self, hidden_states):
        return self.blur(self.attn.to_q(hidden_states))

    def __getattr__(self, name):
        return getattr(self.__dict__["attn"], name)


class SEG(Term):
    name = "seg"
    order = 20
    settings = (
        scale(
            "seg_scale",
            (
                "Smoothed Energy Guidance (Hong 2024) scale in `+ s_seg * (o_cond - o_smoothed)`: the conditional "
                "rows again, with the queries of `seg_layers` blurred over the layer's (h, w) grid by a Gaussian of "
                "`seg_blur_sigma`. 0 (the default) is off; diffusers' guider defaults to 2.8. B more rows per step. "
                "One number, or one per image (as `scale`)."
            ),
        ),
        Setting(
            "seg_layers",
            ("mid",),
            check_layers,
            (
                "Where SEG blurs the queries: identifiers matched as `pag_layers` (diffusers' PAG matching; the SEG "
                "paper blurs the mid block's self-attention on SDXL)."
            ),
        ),
        real(
            "seg_blur_sigma",
            9999999.0,
            (
                "Standard deviation of SEG's query blur in tokens of the layer's grid. At or above 9999.0 (diffusers' "
                "`seg_blur_threshold_inf`) the blur is infinite: every query becomes the mean query, so every token "
                "attends uniformly (the paper's default). Smaller values smooth less; the paper controls it on a log "
                "scale."
            ),
            low=0.0,
            low_ok=False,
        ),
        interval(
            "seg_interval",
            ("Steps with SEG (as `cfg_interval`; diffusers' SEG guider counts `start < i`, sagfast `start <= i` as for every interval)."),
        ),
    )
    scale_field = "seg_scale"
    interval_field = "seg_interval"
    layers_field = "seg_layers"
    source = "cond"

    @classmethod
    def unsupported(cls, family) -> str | None:
        if family.token_grid != "hw":
            return f"its query blur lays the tokens on an (h, w) grid, and {family.name}'s layers' tokens are on ({', '.join(family.token_grid)})"
        return super().unsupported(family)

    def rows(self, step) -> Rows:
        image = self.call.family.to_image(step.sample, step.call)
        image_hw, sigma = tuple(image.shape[-2:]), self.config.seg_blur_sigma

        def blur(q):
            return blur_queries(q, *token_grid(image_hw, q.shape[1]), sigma)

        def smoothed(own, attn, hidden_states, *args, **kwargs):
            return own(SmoothedQueries(attn, blur), hidden_states, *args, **kwargs)

        return Rows(step.sample[step.cond], step.cond, AttentionRule(self.layers, smoothed))
