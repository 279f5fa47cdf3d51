"""Combine: add the SAG term to every CFG chunk of the model output.

The guided denoiser returns outputs in the layout the pipeline expects, so that the pipeline's own
CFG line `o_u + g * (o_c - o_u)` yields `cfg(o_u, o_c) + s * (o_guide - o_deg)`:

    out[k] = o[k] + s * (o_guide - o_deg)     for each chunk k of o ([uncond, cond] or [cond])

More guidance terms add further `(scale, positive, negative)` triples, `extra_terms=`: PAG's is
`(s_pag, o_cond, o_perturbed)`.
"""

from __future__ import annotations

import torch

from sagfast.ops import _cpp, _triton
from sagfast.ops._dispatch import Backend, dispatch

FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_combine_inputs(o, guide, degraded, extra_terms=()) -> None:
    if guide.shape != degraded.shape:
        raise ValueError(f"guide and degraded must have one shape; got {tuple(guide.shape)} and {tuple(degraded.shape)}")
    b = guide.shape[0]
    if o.dim() != guide.dim() or o.shape[1:] != guide.shape[1:] or b == 0 or o.shape[0] % b:
        raise ValueError(f"o must be [n*B, ...] with guide's trailing shape; got o {tuple(o.shape)}, guide {tuple(guide.shape)}")
    for term in extra_terms:
        if len(term) != 3 or term[1].shape != guide.shape or term[2].shape != guide.shape:
            raise ValueError("each extra term must be (scale, positive, negative) with guide's shape")


def combine_ref(o: torch.Tensor, guide: torch.Tensor, degraded: torch.Tensor, scale, extra_terms=()) -> torch.Tensor:
    """The spec: o [n*B, ...], guide/degraded [B, ...], scale a float or 0-d tensor. fp32 math, o's dtype.

    `extra_terms`: further (scale, positive, negative) triples, added in order after the SAG term.
    """
    check_combine_inputs(o, guide, degraded, extra_terms)
    n = o.shape[0] // guide.shape[0]
    term = None
    for s, pos, neg in ((scale, guide, degraded), *extra_terms):
        # A Python scale stays a Python scalar: a tensor made from it would be a host-to-device copy,
        # which a CUDA graph capture refuses.
        t = (pos.float() - neg.float()) * (s.float() if torch.is_tensor(s) else float(s))
        term = t if term is None else term + t
    return (o.float() + term.repeat(n, *([1] * (o.dim() - 1)))).to(o.dtype)


def _scale_reasons(scale, extra_terms) -> list[str]:
    scales = [scale] + [t[0] for t in extra_terms]
    if any(torch.is_tensor(s) for s in scales):
        return ["scales must be Python numbers (a tensor scale is taken by the torch backend only)"]
    return []


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

MAX_TRITON_TERMS = 2


def _triton_supports(o, guide, degraded, scale, extra_terms=()) -> list[str]:
    out = _triton.device_reasons(o) + _dtype_reasons(o, guide, degraded, extra_terms)
    out += _scale_reasons(scale, extra_terms)
    if 1 + len(extra_terms) > MAX_TRITON_TERMS:
        out.append(f"{1 + len(extra_terms)} guidance terms; the kernel has {MAX_TRITON_TERMS} slots")
    if o.device.type == "cpu" and o.dtype == torch.bfloat16:
        out.append("bf16 under the Triton interpreter is not trusted (it computes bf16 arithmetic wrongly); bf16 is GPU-only")
    return out


@torch.library.custom_op("sagfast::combine_triton", mutates_args=())
def combine_triton(o: torch.Tensor, pos: list[torch.Tensor], neg: list[torch.Tensor], scales: list[float]) -> torch.Tensor:
    """o[k] + sum_t scales[t] * (pos[t] - neg[t]) for every chunk k, with the Triton kernel (<= 2 terms)."""
    import triton

    kern = _triton.kernels("combine")
    oc = o.contiguous()
    pos = [p.contiguous() for p in pos]
    neg = [n.contiguous() for n in neg]
    out = torch.empty_like(oc)
    m = pos[0].numel()
    two = len(pos) > 1
    block = 8192 if o.device.type == "cpu" else 1024
    with _triton.on_device(oc):
        kern.combine_kernel[(triton.cdiv(m, block),)](
            oc,
            pos[0],
            neg[0],
            pos[1] if two else pos[0],
            neg[1] if two else neg[0],
            out,
            m,
            oc.numel() // max(1, m),
            float(scales[0]),
            float(scales[1]) if two else 0.0,
            NUM_TERMS=len(pos),
            BLOCK=block,
        )
    return out


@combine_triton.register_fake
def _(o, pos, neg, scales):
    return torch.empty_like(o, memory_format=torch.contiguous_format)


# --- C++ ---------------------------------------------------------------------------------------------


def _cpp_supports(o, guide, degraded, scale, extra_terms=()) -> list[str]:
    return _cpp.device_reasons(o) + _dtype_reasons(o, guide, degraded, extra_terms) + _scale_reasons(scale, extra_terms)


def _terms(guide, degraded, scale, extra_terms):
    terms = [(scale, guide, degraded), *extra_terms]
    return [t[1] for t in terms], [t[2] for t in terms], [float(t[0]) for t in terms]


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
    scales = [scale] + [t[0] for t in extra_terms]
    return (
        tuple((t.device, t.dtype) for t in tensors),
        tuple(torch.is_tensor(s) for s in scales),
        _triton.interpreting(),
    )


def combine(o, guide, degraded, scale, *, backend: str = "auto", extra_terms=()) -> torch.Tensor:
    """o[k] + scale * (guide - degraded) for every chunk k of o, plus any `extra_terms`
    ((scale, positive, negative) triples, e.g. PAG's), in o's dtype."""
    extra_terms = tuple(tuple(t) for t in extra_terms)
    check_combine_inputs(o, guide, degraded, extra_terms)
    inputs = (o, guide, degraded, scale, extra_terms)
    impl = dispatch("combine", BACKENDS, backend, inputs, key=_key(*inputs))
    return impl(*inputs)
