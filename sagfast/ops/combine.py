"""Combine: add the SAG term to every CFG chunk of the model output.

The guided denoiser returns outputs in the layout the pipeline expects, so that the pipeline's own
CFG line `o_u + g * (o_c - o_u)` yields `cfg(o_u, o_c) + s * (o_guide - o_deg)`:

    out[k] = o[k] + s * (o_guide - o_deg)     for each chunk k of o ([uncond, cond] or [cond])

More guidance terms add further `(scale, positive, negative)` triples, `extra_terms=`, any number of
them: PAG's is `(s_pag, o_cond, o_perturbed)`. A scale may be one number or one per row (a [B]
tensor): images with different guidance settings share one batch.
"""

from __future__ import annotations

import torch

from sagfast.ops import _cpp, _triton
from sagfast.ops._dispatch import Backend, dispatch

FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_combine_inputs(o, guide, degraded, scale=0.0, extra_terms=()) -> None:
    if guide.shape != degraded.shape:
        raise ValueError(f"guide and degraded must have one shape; got {tuple(guide.shape)} and {tuple(degraded.shape)}")
    b = guide.shape[0]
    if o.dim() != guide.dim() or o.shape[1:] != guide.shape[1:] or b == 0 or o.shape[0] % b:
        raise ValueError(f"o must be [n*B, ...] with guide's trailing shape; got o {tuple(o.shape)}, guide {tuple(guide.shape)}")
    for term in extra_terms:
        if len(term) != 3 or term[1].shape != guide.shape or term[2].shape != guide.shape:
            raise ValueError("each extra term must be (scale, positive, negative) with guide's shape")
    for s in (scale, *(t[0] for t in extra_terms)):
        if torch.is_tensor(s) and not (s.dim() == 0 or (s.dim() == 1 and s.shape[0] == b)):
            raise ValueError(
                f"a term's scale must be a number, a 0-d tensor or a 1-D tensor of {b} (one per row); got shape {tuple(s.shape)}"
            )


def _row_scale(s, like: torch.Tensor) -> torch.Tensor | float:
    """A term's scale broadcastable over its [B, ...] tensors: a Python float as it is, a tensor as [B, 1, ...] fp32."""
    if not torch.is_tensor(s):
        return float(s)
    return s.float().reshape(-1, *([1] * (like.dim() - 1))).to(like.device)


def combine_ref(o: torch.Tensor, guide: torch.Tensor, degraded: torch.Tensor, scale, extra_terms=()) -> torch.Tensor:
    """The spec: o [n*B, ...], guide/degraded [B, ...]; a scale is a float, a 0-d tensor or a [B] tensor
    (one per row). fp32 math, o's dtype.

    `extra_terms`: further (scale, positive, negative) triples, added in order after the first term.
    """
    check_combine_inputs(o, guide, degraded, scale, extra_terms)
    n = o.shape[0] // guide.shape[0]
    term = None
    for s, pos, neg in ((scale, guide, degraded), *extra_terms):
        # A Python scale stays a Python scalar: a tensor made from it would be a host-to-device copy,
        # which a CUDA graph capture refuses.
        t = (pos.float() - neg.float()) * _row_scale(s, pos)
        term = t if term is None else term + t
    return (o.float() + term.repeat(n, *([1] * (o.dim() - 1)))).to(o.dtype)


def scale_table(scales: list, b: int, device) -> torch.Tensor:
    """The terms' scales as one fp32 [T, B] tensor on `device` (what the kernels read). A Python number
    becomes a fill (no host-to-device copy: CUDA-graph capturable); a tensor is expanded to B rows."""
    rows = [
        s.float().to(device).expand(b) if torch.is_tensor(s) else torch.full((b,), float(s), dtype=torch.float32, device=device)
        for s in scales
    ]
    return torch.stack(rows)


def _dtype_reasons(o, guide, degraded, extra_terms) -> list[str]:
    tensors = [guide, degraded] + [x for t in extra_terms for x in t[1:]]
    out = []
    if o.dtype not in FLOAT_TYPES:
        out.append(f"o dtype {o.dtype} is not one of fp32, fp16, bf16")
    if any(t.dtype != o.dtype for t in tensors):
        out.append("every tensor must have o's dtype")
    if any(t.device != o.device for t in tensors):
        out.append("every tensor must be on o's device")
    return out


# --- Triton ------------------------------------------------------------------------------------------


def _triton_supports(o, guide, degraded, scale, extra_terms=()) -> list[str]:
    out = _triton.device_reasons(o) + _dtype_reasons(o, guide, degraded, extra_terms)
    if o.device.type == "cpu" and o.dtype == torch.bfloat16:
        out.append("bf16 under the Triton interpreter is not trusted (it computes bf16 arithmetic wrongly); bf16 is GPU-only")
    return out


@torch.library.custom_op("sagfast::combine_triton", mutates_args=())
def combine_triton(o: torch.Tensor, pos: list[torch.Tensor], neg: list[torch.Tensor], scales: torch.Tensor) -> torch.Tensor:
    """o[k] + sum_t scales[t, row] * (pos[t] - neg[t]) for every chunk k, with the Triton kernel; any
    number of terms (stacked into one [T, M] tensor each), `scales` fp32 [T, B]."""
    import triton

    kern = _triton.kernels("combine")
    oc = o.contiguous()
    stacked_pos = torch.stack([p.contiguous() for p in pos])
    stacked_neg = torch.stack([n.contiguous() for n in neg])
    out = torch.empty_like(oc)
    m, b = pos[0].numel(), pos[0].shape[0]
    block = 8192 if o.device.type == "cpu" else 1024
    with _triton.on_device(oc):
        kern.combine_kernel[(triton.cdiv(m, block),)](
            oc, stacked_pos, stacked_neg, scales.contiguous(), out, m, b, oc.numel() // max(1, m), len(pos), BLOCK=block
        )
    return out


@combine_triton.register_fake
def _(o, pos, neg, scales):
    return torch.empty_like(o, memory_format=torch.contiguous_format)


# --- C++ ---------------------------------------------------------------------------------------------


def _cpp_supports(o, guide, degraded, scale, extra_terms=()) -> list[str]:
    return _cpp.device_reasons(o) + _dtype_reasons(o, guide, degraded, extra_terms)


def _terms(guide, degraded, scale, extra_terms):
    terms = [(scale, guide, degraded), *extra_terms]
    return [t[1] for t in terms], [t[2] for t in terms], scale_table([t[0] for t in terms], guide.shape[0], guide.device)


def _cpp_run(o, guide, degraded, scale, extra_terms=()):
    return torch.ops.sagfast.combine(o, *_terms(guide, degraded, scale, extra_terms))


def _triton_run(o, guide, degraded, scale, extra_terms=()):
    return combine_triton(o, *_terms(guide, degraded, scale, extra_terms))


BACKENDS = (
    Backend("triton", _triton.available, _triton_supports, _triton_run, _triton.auto_skip),
    Backend("cpp", _cpp.available, _cpp_supports, _cpp_run),
    Backend("torch", lambda: [], lambda *a: [], combine_ref),
)


def _key(o, guide, degraded, scale, extra_terms):
    # Everything the backends' supports() look at.
    tensors = [o, guide, degraded] + [x for t in extra_terms for x in t[1:]]
    return (tuple((t.device, t.dtype) for t in tensors), _triton.interpreting())


def combine(o, guide, degraded, scale, *, backend: str = "auto", extra_terms=()) -> torch.Tensor:
    """o[k] + scale * (guide - degraded) for every chunk k of o, plus any number of `extra_terms`
    ((scale, positive, negative) triples, e.g. PAG's), in o's dtype. Every scale is a number, a 0-d
    tensor or a [B] tensor (one per row of the terms' B rows: per-image scales), in every backend."""
    extra_terms = tuple(tuple(t) for t in extra_terms)
    check_combine_inputs(o, guide, degraded, scale, extra_terms)
    inputs = (o, guide, degraded, scale, extra_terms)
    impl = dispatch("combine", BACKENDS, backend, inputs, key=_key(*inputs))
    return impl(*inputs)
