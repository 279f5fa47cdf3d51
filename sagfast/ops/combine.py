"""Combine: add the SAG term to every CFG chunk of the model output.

The guided denoiser returns outputs in the layout the pipeline expects, so that the pipeline's own
CFG line `o_u + g * (o_c - o_u)` yields `cfg(o_u, o_c) + s * (o_guide - o_deg)`:

    out[k] = o[k] + s * (o_guide - o_deg)     for each chunk k of o ([uncond, cond] or [cond])

More guidance terms (PAG) add further `(scale, positive, negative)` triples.
"""

from __future__ import annotations

import torch

from sagfast.ops._dispatch import Backend, dispatch


def check_combine_inputs(o, guide, degraded) -> None:
    if guide.shape != degraded.shape:
        raise ValueError(f"guide and degraded must have one shape; got {tuple(guide.shape)} and {tuple(degraded.shape)}")
    b = guide.shape[0]
    if o.dim() != guide.dim() or o.shape[1:] != guide.shape[1:] or b == 0 or o.shape[0] % b:
        raise ValueError(
            f"o must be [n*B, ...] with guide's trailing shape; got o {tuple(o.shape)}, guide {tuple(guide.shape)}"
        )


def combine_ref(o: torch.Tensor, guide: torch.Tensor, degraded: torch.Tensor, scale) -> torch.Tensor:
    """The spec: o [n*B, ...], guide/degraded [B, ...], scale a float or 0-d tensor. fp32 math, o's dtype."""
    check_combine_inputs(o, guide, degraded)
    n = o.shape[0] // guide.shape[0]
    s = torch.as_tensor(scale, dtype=torch.float32, device=o.device)
    term = s * (guide.float() - degraded.float())
    return (o.float() + term.repeat(n, *([1] * (o.dim() - 1)))).to(o.dtype)


BACKENDS = (Backend("torch", lambda: [], lambda *a: [], combine_ref),)


def combine(o, guide, degraded, scale, *, backend: str = "auto") -> torch.Tensor:
    check_combine_inputs(o, guide, degraded)
    impl = dispatch("combine", BACKENDS, backend, (o, guide, degraded, scale))
    return impl(o, guide, degraded, scale)
