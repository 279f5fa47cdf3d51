"""Attention mass in Triton: per-key received attention, without the N x N map.

Reference: `sagfast.ops.attention_mass.attention_mass_ref`. For one (sample b, head h),
`P[i, j] = exp(q_i . k_j * scale - lse_i)` is the softmax of row i (lse from SDPA), and key j receives
`sum_i P[i, j]`. The mass of key j is the mean of that over heads.

Shape of the computation: flash-attention's dK/dV loop. One program owns a block of keys of one
(b, h), keeps them in registers, and walks over all query blocks recomputing the scores tile by tile,
so only a [BLOCK_M, BLOCK_N] tile of P ever exists. The per-(b, h) sums land in a [B, H, N] fp32
buffer; a second small kernel averages over heads (in a fixed order, so results are deterministic:
no atomics) and applies the threshold, which gives the SAG mask without another pass in PyTorch.
"""

import triton
import triton.language as tl


@triton.jit
def attention_mass_partial_kernel(
    Q,
    K,
    LSE,
    PART,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_lb,
    stride_lh,
    stride_ln,
    stride_pb,
    stride_ph,
    stride_pn,
    H,
    N,
    D,
    scale_log2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LOWP_DOT: tl.constexpr,
):
    """Sum over all queries of P[i, j] for one block of keys j of one (b, h).

    Q: queries [B, H, N, D], any strides (the capture processor passes transposed views), stride_q*.
    K: keys [B, H, N, D], any strides, stride_k*.
    LSE: per-row log-sum-exp of the scaled scores, natural log, [B, H, N], stride_l*.
    PART: output, per-head key sums [B, H, N] fp32, stride_p*.
    H, N, D: heads, tokens, head dim (D <= BLOCK_D, a power of 2: the tail is masked to 0).
    scale_log2: softmax scale * log2(e), so that exp(x) is computed as exp2 (one instruction on GPU).
    LOWP_DOT: feed 16-bit operands to tl.dot as they are (exact products, fp32 accumulate: what the
        tensor cores do); otherwise the dot runs on fp32 operands with IEEE precision (no TF32, whose
        10-bit mantissa would move scores by ~1e-3 relative and flip mask bits).

    Grid: (cdiv(N, BLOCK_N), B * H).
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D

    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    k = tl.load(k_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    if not LOWP_DOT:
        # Upcast right after the load: the interpreter computes bf16 arithmetic wrongly.
        k = k.to(tl.float32)

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    l_base = LSE + b * stride_lb + h * stride_lh
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q = tl.load(
            q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        # Rows past N get lse = +inf, so their P is exp2(-inf) = 0 and they add nothing.
        lse = tl.load(l_base + offs_m * stride_ln, mask=mask_m, other=float("inf")).to(tl.float32)
        if LOWP_DOT:
            s = tl.dot(q, tl.trans(k))
        else:
            s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
        p = tl.exp2(s * scale_log2 - lse[:, None] * 1.4426950408889634)  # log2(e)
        acc += tl.sum(p, axis=0)

    tl.store(PART + b * stride_pb + h * stride_ph + offs_n * stride_pn, acc, mask=mask_n)


@triton.jit
def attention_mass_reduce_kernel(
    PART,
    MASS,
    MASK,
    stride_pb,
    stride_ph,
    stride_pn,
    H,
    N,
    threshold,
    BLOCK: tl.constexpr,
):
    """Mean over heads of the per-head key sums, and the SAG mask `mass > threshold`.

    PART: per-head sums [B, H, N] fp32, stride_p*.
    MASS: output [B, N] fp32, contiguous.
    MASK: output [B, N] bool, contiguous: `mass > threshold` (pass +inf when no mask is wanted).
    Grid: (cdiv(N, BLOCK), B). One program: BLOCK keys of one sample, heads summed in order 0..H-1.
    """
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for h in range(0, H):
        acc += tl.load(PART + b * stride_pb + h * stride_ph + offs * stride_pn, mask=m, other=0.0)
    mass = acc / H
    tl.store(MASS + b * N + offs, mass, mask=m)
    tl.store(MASK + b * N + offs, mass > threshold, mask=m)
