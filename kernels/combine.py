"""Triton kernel of the combine op.

Reference: `sagfast.ops.combine.combine_ref`:

    out[k] = o[k] + sum_t scales[t, row] * (pos[t] - neg[t])      for each chunk k of o

Any number of terms T: their tensors arrive stacked ([T, M] each), so one kernel serves every term
count (a pointer argument per term would compile a kernel per count). Each term's scale is per row
of the [B, ...] term slice (an fp32 [T, B] tensor: per-image guidance scales in one batch). Terms
are summed in fp32 and rounded once into o's dtype.
"""

import triton
import triton.language as tl


@triton.jit
def combine_kernel(
    O,
    POS,
    NEG,
    SCALES,
    OUT,
    M,
    B,
    chunks,
    num_terms,
    BLOCK: tl.constexpr,
):
    """One BLOCK of a [B, ...] term slice, applied to every one of the `chunks` chunks of o.

    O: model output [chunks * B, ...], contiguous, M = B * prod(...) elements per chunk.
    POS, NEG: the terms' tensors stacked, [num_terms, M], contiguous.
    SCALES: fp32 [num_terms, B]: term t's scale for row b.
    OUT: output, o's shape and dtype, contiguous.
    Grid: (cdiv(M, BLOCK),). The term sum is computed once and reused across chunks: each input byte
    is read once.
    """
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < M
    row = offs // (M // B)
    term = tl.zeros([BLOCK], dtype=tl.float32)
    for t in range(0, num_terms):
        s = tl.load(SCALES + t * B + row, mask=m, other=0.0)
        p = tl.load(POS + t * M + offs, mask=m, other=0.0).to(tl.float32)
        n = tl.load(NEG + t * M + offs, mask=m, other=0.0).to(tl.float32)
        term += s * (p - n)
    for k in range(0, chunks):
        o = tl.load(O + k * M + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + k * M + offs, (o + term).to(OUT.dtype.element_ty), mask=m)
