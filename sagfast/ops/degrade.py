"""Degrade: blur x0 where the mask is set, then re-noise it to the step's noise level.

    x0b = GaussianBlur(x0)                        (separable, reflect padding)
    x0d = M * x0b + (1 - M) * x0                  (M: low-res mask upsampled by index)
    xd  = sqrt(abar) * x0d + sqrt(1 - abar) * eps
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from sagfast.ops._dispatch import Backend, dispatch
from sagfast.ops.mask import upsample_mask_ref


@functools.lru_cache(maxsize=32)
def gaussian_weights(kernel_size: int, sigma: float) -> torch.Tensor:
    """1-D Gaussian window, fp32, sums to 1 (the same samples as diffusers' gaussian_blur_2d)."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, dtype=torch.float32)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def check_degrade_inputs(x0, mask, eps, abar, kernel_size) -> None:
    if x0.dim() != 4:
        raise ValueError(f"x0 must be [B, C, H, W]; got {tuple(x0.shape)}")
    if eps.shape != x0.shape:
        raise ValueError(f"eps must have x0's shape {tuple(x0.shape)}; got {tuple(eps.shape)}")
    b, _, hgt, wid = x0.shape
    if mask.dim() != 3 or mask.shape[0] != b:
        raise ValueError(f"mask must be [B, h, w] with B = {b}; got {tuple(mask.shape)}")
    if mask.shape[1] > hgt or mask.shape[2] > wid:
        raise ValueError(f"mask {tuple(mask.shape[1:])} is larger than the latent {hgt}x{wid}")
    if abar.dim() != 1 or abar.shape[0] != b:
        raise ValueError(f"abar must be a [B] tensor with B = {b}; got {tuple(abar.shape)}")
    check_blur_size(hgt, wid, kernel_size)


def check_blur_size(height: int, width: int, kernel_size: int) -> None:
    pad = kernel_size // 2
    if height <= pad or width <= pad:
        raise ValueError(
            f"latent {height}x{width} is too small for a blur of kernel size {kernel_size}: reflect padding "
            f"needs height and width >= {pad + 1}"
        )


def blur_ref(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, computed in fp32."""
    c = x.shape[1]
    wts = gaussian_weights(kernel_size, float(sigma)).to(x.device)
    pad = kernel_size // 2
    xf = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    xf = F.conv2d(xf, wts.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    return F.conv2d(xf, wts.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)


def degrade_ref(x0, mask, eps, abar, kernel_size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """The spec. x0, eps: [B, C, H, W]; mask: [B, h, w] (bool or 0/1); abar: [B]. Returns x0's dtype."""
    check_degrade_inputs(x0, mask, eps, abar, kernel_size)
    m = upsample_mask_ref(mask != 0, x0.shape[2], x0.shape[3])
    x0f = x0.float()
    x0d = torch.where(m, blur_ref(x0, kernel_size, sigma), x0f)
    a = abar.float().view(-1, 1, 1, 1)
    return (a.sqrt() * x0d + (1 - a).sqrt() * eps.float()).to(x0.dtype)


BACKENDS = (Backend("torch", lambda: [], lambda *a: [], degrade_ref),)


def degrade(x0, mask, eps, abar, kernel_size: int = 9, sigma: float = 1.0, *, backend: str = "auto"):
    """The degraded, re-noised latent (see the module docstring)."""
    check_degrade_inputs(x0, mask, eps, abar, kernel_size)
    impl = dispatch("degrade", BACKENDS, backend, (x0, mask, eps, abar, kernel_size, sigma))
    return impl(x0, mask, eps, abar, kernel_size, sigma)
