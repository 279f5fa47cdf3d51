"""Degrade: blur x0 where the mask is set, then re-noise it to the step's noise level.

x0b = GaussianBlur(x0)                        (separable, reflect padding)
x0d = M * x0b + (1 - M) * x0                  (M: low-res mask upsampled by index)
xd  = sqrt(abar) * x0d + sqrt(1 - abar) * eps
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from sagfast.ops import _cpp, _triton
from sagfast.ops._dispatch import Backend, dispatch
from sagfast.ops.mask import upsample_mask_ref


@functools.cache
def gaussian_weights(kernel_size: int, sigma: float, device: torch.device | None = None) -> torch.Tensor:
    """1-D Gaussian window, fp32, sums to 1 (the same samples as diffusers' gaussian_blur_2d).

    Cached per device and never evicted: a blur inside a captured CUDA graph reads this tensor by
    address (and copying it from the host every step would be a synchronizing copy, which capture
    refuses).
    """
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, dtype=torch.float32)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return (pdf / pdf.sum()).to(device)


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
    wts = gaussian_weights(kernel_size, float(sigma), x.device)
    pad = kernel_size // 2
    xf = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    xf = F.conv2d(xf, wts.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    return F.conv2d(xf, wts.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)


def blur_time(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """x [B, C, T, H, W] blurred over its frames (T) by a Gaussian of `sigma` frames, reflect padding,
    in fp32. The window is `kernel_size` cut to the longest that reflect padding allows (2T - 1): the
    video mode of SAG's blur (`blur_sigma_t`). PyTorch only: one depthwise 1-D pass over a latent is
    a small part of a video step."""
    t = x.shape[2]
    size = min(kernel_size, 2 * t - 1)
    if size <= 1:
        return x.float()
    b, c, _, h, w = x.shape
    wts = gaussian_weights(size, float(sigma), x.device)
    rows = x.float().permute(0, 1, 3, 4, 2).reshape(-1, 1, t)  # one sequence of T values per (b, c, h, w)
    rows = F.conv1d(F.pad(rows, (size // 2, size // 2), mode="reflect"), wts.view(1, 1, -1))
    return rows.reshape(b, c, h, w, t).permute(0, 1, 4, 2, 3)


def degrade_ref(x0, mask, eps, abar, kernel_size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """The spec. x0, eps: [B, C, H, W]; mask: [B, h, w] (bool or 0/1); abar: [B]. Returns x0's dtype."""
    check_degrade_inputs(x0, mask, eps, abar, kernel_size)
    m = upsample_mask_ref(mask != 0, x0.shape[2], x0.shape[3])
    x0f = x0.float()
    x0d = torch.where(m, blur_ref(x0, kernel_size, sigma), x0f)
    a = abar.float().view(-1, 1, 1, 1)
    return (a.sqrt() * x0d + (1 - a).sqrt() * eps.float()).to(x0.dtype)


FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def _common_reasons(x0, mask, eps, abar) -> list[str]:
    out = []
    if x0.dtype not in FLOAT_TYPES:
        out.append(f"x0 dtype {x0.dtype} is not one of fp32, fp16, bf16")
    if not abar.dtype.is_floating_point:
        out.append(f"abar must be floating point, got {abar.dtype}")
    if len({x0.device, mask.device, eps.device, abar.device}) > 1:
        out.append("x0, mask, eps and abar must be on one device")
    return out


# --- Triton ------------------------------------------------------------------------------------------

MAX_TRITON_KERNEL_SIZE = 15


def _triton_supports(x0, mask, eps, abar, kernel_size, sigma) -> list[str]:
    out = _triton.device_reasons(x0, mask, eps, abar) + _common_reasons(x0, mask, eps, abar)
    if eps.dtype not in FLOAT_TYPES:
        out.append(f"eps dtype {eps.dtype} is not one of fp32, fp16, bf16")
    if kernel_size > MAX_TRITON_KERNEL_SIZE:
        out.append(f"kernel_size {kernel_size} > {MAX_TRITON_KERNEL_SIZE} (the K x K taps are unrolled)")
    if x0.device.type == "cpu" and torch.bfloat16 in (x0.dtype, eps.dtype):
        out.append("bf16 under the Triton interpreter is not trusted (it computes bf16 arithmetic wrongly); bf16 is GPU-only")
    return out


def _triton_blocks(rows: int, width: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_W) over the B*C*H stacked rows: whole rows when they fit; small tiles on a GPU,
    large ones under the interpreter, where each program costs ~ms whatever its size."""
    # Each program gathers [BLOCK_R, BLOCK_W, KPAD] values per source row: 256 outputs keep that at
    # ~32 registers per thread on a GPU.
    per_program = 8192 if device.type == "cpu" else 256
    block_w = min(_triton.next_pow2(width), 128 if device.type == "cpu" else 64)
    block_r = min(_triton.next_pow2(rows), max(1, per_program // block_w))
    return block_r, block_w


@torch.library.custom_op("sagfast::degrade_triton", mutates_args=())
def degrade_triton(
    x0: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor, kernel_size: int, sigma: float
) -> torch.Tensor:
    """The degraded latent with the Triton kernel (see kernels/degrade.py)."""
    import triton

    kern = _triton.kernels("degrade")
    b, c, hgt, wid = x0.shape
    m = (mask if mask.dtype == torch.bool else mask != 0).view(torch.uint8)
    out = torch.empty_like(x0, memory_format=torch.contiguous_format)
    rows = b * c * hgt
    block_r, block_w = _triton_blocks(rows, wid, x0.device)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(wid, block_w))
    with _triton.on_device(x0):
        kern.degrade_kernel[grid](
            x0,
            m,
            eps,
            abar.contiguous(),
            out,
            *x0.stride(),
            *m.stride(),
            *eps.stride(),
            *out.stride(),
            c,
            hgt,
            wid,
            rows,
            m.shape[1],
            m.shape[2],
            float(sigma),
            KSIZE=int(kernel_size),
            KPAD=max(2, _triton.next_pow2(kernel_size)),
            BLOCK_R=block_r,
            BLOCK_W=block_w,
        )
    return out


@degrade_triton.register_fake
def _(x0, mask, eps, abar, kernel_size, sigma):
    return torch.empty_like(x0, memory_format=torch.contiguous_format)


# --- C++ ---------------------------------------------------------------------------------------------


def _cpp_supports(x0, mask, eps, abar, kernel_size, sigma) -> list[str]:
    out = _cpp.device_reasons(x0, mask, eps, abar) + _common_reasons(x0, mask, eps, abar)
    if eps.dtype != x0.dtype:
        out.append(f"eps dtype {eps.dtype} differs from x0 dtype {x0.dtype}")
    return out


def _cpp_run(x0, mask, eps, abar, kernel_size, sigma):
    return torch.ops.sagfast.degrade(x0, mask, eps, abar, int(kernel_size), float(sigma))


def _triton_run(x0, mask, eps, abar, kernel_size, sigma):
    return degrade_triton(x0, mask, eps, abar, int(kernel_size), float(sigma))


BACKENDS = (
    Backend("triton", _triton.available, _triton_supports, _triton_run, _triton.auto_skip),
    Backend("cpp", _cpp.available, _cpp_supports, _cpp_run),
    Backend("torch", lambda: [], lambda *a: [], degrade_ref),
)


def _key(x0, mask, eps, abar, kernel_size):
    # Everything the backends' supports() look at.
    devices = (x0.device, mask.device, eps.device, abar.device)
    return devices + (x0.dtype, eps.dtype, abar.dtype, kernel_size > MAX_TRITON_KERNEL_SIZE, _triton.interpreting())


def degrade(x0, mask, eps, abar, kernel_size: int = 9, sigma: float = 1.0, *, backend: str = "auto"):
    """The degraded, re-noised latent (see the module docstring), in x0's dtype."""
    check_degrade_inputs(x0, mask, eps, abar, kernel_size)
    inputs = (x0, mask, eps, abar, kernel_size, sigma)
    impl = dispatch("degrade", BACKENDS, backend, inputs, key=_key(x0, mask, eps, abar, kernel_size))
    return impl(*inputs)
