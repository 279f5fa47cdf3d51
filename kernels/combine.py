"""Combine in Triton: the guidance terms added to every CFG chunk, one elementwise kernel.

Reference: `sagfast.ops.combine.combine_ref`:

    out[k] = o[k] + s1 * (pos1 - neg1) [+ s2 * (pos2 - neg2)]      for each chunk k of o

With SAG, (s1, pos1, neg1) = (sag scale, o_guide, o_degraded); with SAG and PAG the second slot is
(pag scale, o_cond, o_perturbed) (PAG alone uses the first slot). A third term is one more pointer
pair and one more `if NUM_TERMS > 2` block. Terms are summed in fp32 and rounded once into o's dtype.
"""

import triton
import triton.language as tl


@triton.jit
def combine_kernel(
    O,
    POS1,
    NEG1,
    POS2,
    NEG2,
    OUT,
    M,
    chunks,
    s1,
    s2,
    NUM_TERMS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One BLOCK of a [B, ...] term slice, applied to every one of the `chunks` chunks of o.

    O: model output [chunks * B, ...], contiguous, M = B * prod(...) elements per chunk.
    POS1, NEG1: first term's tensors [B, ...], contiguous.
    POS2, NEG2: second term's tensors (ignored unless NUM_TERMS == 2).
    OUT: output, o's shape and dtype, contiguous.
    s1, s2: the terms' scales (fp32 scalars).
    Grid: (cdiv(M, BLOCK),). The term is computed once and reused across chunks: each input byte is
    read once.
    """
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < M
    term = s1 * (tl.load(POS1 + offs, mask=m, other=0.0).to(tl.float32) - tl.load(NEG1 + offs, mask=m, other=0.0).to(tl.float32))
    if NUM_TERMS > 1:
        term += s2 * (tl.load(POS2 + offs, mask=m, other=0.0).to(tl.float32) - tl.load(NEG2 + offs, mask=m, other=0.0).to(tl.float32))
    for k in range(0, chunks):
        o = tl.load(O + k * M + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + k * M + offs, (o + term).to(OUT.dtype.element_ty), mask=m)
