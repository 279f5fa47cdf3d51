"""Degrade in Triton: blur, masked blend and re-noise in one pass over memory.

Reference: `sagfast.ops.degrade.degrade_ref`:

    x0b = GaussianBlur(x0)                        (separable, reflect padding)
    x0d = M * x0b + (1 - M) * x0                  (M: low-res mask upsampled by index)
    xd  = sqrt(abar) * x0d + sqrt(1 - abar) * eps

One program computes a [BLOCK_R, BLOCK_W] tile of the (b, c) planes stacked row-wise. The blur is
the separable sum `sum_dy w[dy] * sum_dx w[dx] * x[reflect(i+dy-p), reflect(j+dx-p)]` (row pass
inside, column pass outside, the reference's order): for each of the K source rows, one gather of
[BLOCK_R, BLOCK_W, K] neighbours straight from global memory, weighted and summed over the tap axis.
The K*K reads per output hit L1/L2, so DRAM sees x0, eps and the output once each, and there is no
intermediate blurred tensor. Latents are small (SDXL: 4 x 128 x 128 per sample), so this op is launch
bound on a GPU; what matters is one launch and no temporaries.

The Gaussian weights are computed inside the kernel from `sigma` (one vector of K exponentials), so the
op takes no weight tensor: nothing to upload per call, which keeps it CUDA-graph safe. `abar` is read
from a [B] tensor for the same reason.
"""

import triton
import triton.language as tl


@triton.jit
def _reflect(idx, n):
    # Reflect padding without repeating the edge ("reflect", not "symmetric"); valid for pad <= n - 1.
    idx = tl.where(idx < 0, -idx, idx)
    return tl.where(idx > n - 1, 2 * (n - 1) - idx, idx)


@triton.jit
def degrade_kernel(
    X0,
    MASK,
    EPS,
    ABAR,
    OUT,
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_mb,
    stride_mh,
    stride_mw,
    stride_eb,
    stride_ec,
    stride_eh,
    stride_ew,
    stride_ob,
    stride_oc,
    stride_oh,
    stride_ow,
    C,
    Hgt,
    Wid,
    ROWS,
    mask_h,
    mask_w,
    sigma,
    KSIZE: tl.constexpr,
    KPAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """One [BLOCK_R, BLOCK_W] output tile of the planes stacked row-wise.

    The B * C planes are seen as one image of ROWS = B * C * Hgt rows: stacked row g is row g % Hgt of
    plane g // Hgt = (b, c). Reflection is done per plane, so a tile may straddle planes; small latents
    then take few programs (and the interpreter, ~ms per program, stays fast).
    X0: predicted clean latent [B, C, Hgt, Wid], any strides, stride_x*.
    MASK: low-resolution SAG mask [B, mask_h, mask_w], bool viewed as uint8, any strides, stride_m*;
        output row i reads mask row floor(i * mask_h / Hgt) (same for columns): nearest upsampling in
        integer arithmetic, the reference's index.
    EPS: noise [B, C, Hgt, Wid], any strides, stride_e*.
    ABAR: cumulative alpha [B] (contiguous), read per sample.
    OUT: degraded latent [B, C, Hgt, Wid] (x0's dtype), stride_o*.
    sigma: Gaussian standard deviation; KSIZE: odd window size (pad = KSIZE // 2 <= min(Hgt, Wid) - 1);
    KPAD: KSIZE rounded up to a power of 2 (the tap axis of the row gathers).
    Grid: (cdiv(ROWS, BLOCK_R), cdiv(Wid, BLOCK_W)).
    """
    g = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    inside = (g[:, None] < ROWS) & (cols[None, :] < Wid)
    # Out-of-range lanes are clamped so that their (discarded) gathers stay in bounds.
    g = tl.minimum(g, ROWS - 1)
    q = tl.minimum(cols, Wid - 1)
    plane = g // Hgt
    r = g % Hgt
    b = plane // C
    c = plane % C

    # The Gaussian window as a vector over the tap axis (gaussian_weights(): samples at -half..half,
    # normalised to sum 1); lanes past KSIZE get weight 0.
    half = (KSIZE - 1) * 0.5
    taps = tl.arange(0, KPAD)
    u = (taps.to(tl.float32) - half) / sigma
    wt = tl.where(taps < KSIZE, tl.exp(-0.5 * u * u), 0.0)
    wt = wt / tl.sum(wt, axis=0)
    # Source columns of every (output column, tap): [BLOCK_W, KPAD], reflected, then clamped so the
    # zero-weight lanes past KSIZE stay in bounds.
    src_c = _reflect(q[:, None] + taps[None, :] - KSIZE // 2, Wid)
    src_c = tl.minimum(tl.maximum(src_c, 0), Wid - 1)

    x_plane = b * stride_xb + c * stride_xc
    blurred = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    for dy in tl.static_range(KSIZE):
        wy = tl.sum(tl.where(taps == dy, wt, 0.0), axis=0)  # the same window, tap dy
        src_r = _reflect(r + dy - KSIZE // 2, Hgt)
        # Row pass for source row src_r: one [BLOCK_R, BLOCK_W, KPAD] gather, weighted sum over taps.
        ptrs = X0 + (x_plane + src_r * stride_xh)[:, None, None] + src_c[None, :, :] * stride_xw
        v = tl.load(ptrs).to(tl.float32)  # upcast right after the load (interpreter; fp32 math)
        blurred += wy * tl.sum(v * wt[None, None, :], axis=2)

    x = tl.load(X0 + (x_plane + r * stride_xh)[:, None] + q[None, :] * stride_xw).to(tl.float32)
    mr = (r * mask_h) // Hgt
    mc = (q * mask_w) // Wid
    m = tl.load(MASK + (b * stride_mb + mr * stride_mh)[:, None] + mc[None, :] * stride_mw)
    x0d = tl.where(m != 0, blurred, x)

    e = tl.load(EPS + (b * stride_eb + c * stride_ec + r * stride_eh)[:, None] + q[None, :] * stride_ew)
    a = tl.load(ABAR + b).to(tl.float32)[:, None]
    out = tl.sqrt(a) * x0d + tl.sqrt(1.0 - a) * e.to(tl.float32)
    o_ptrs = OUT + (b * stride_ob + c * stride_oc + r * stride_oh)[:, None] + q[None, :] * stride_ow
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=inside)
