"""Attention mass: how much attention each key receives, averaged over heads.

For one sample, per head `P = softmax(q k^T * scale)` over keys; key j receives `sum_i P[i, j]`; the
mass is the mean of that over heads. Rows of P sum to 1, so the mass averages exactly 1 over keys.
SDPA already returns each row's log-sum-exp (lse), so `P[i, j] = exp(q_i . k_j * scale - lse_i)` can be
recomputed a block of queries at a time: memory stays O(B*H*N) plus one bounded tile, never N x N.
"""

from __future__ import annotations

import torch

from sagfast.ops._dispatch import Backend, check_requested, dispatch

# A tile of scores holds at most this many fp32 elements (32 MiB): bounded whatever N is.
TILE_ELEMENTS = 1 << 23


def _check(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, N, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"self-attention needs q and k of one shape; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"lse must be [B, H, N] = {tuple(q.shape[:3])}; got {tuple(lse.shape)}")


def attention_mass_ref(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """The spec in plain PyTorch. q, k: [B, H, N, D]; lse: [B, H, N] (natural log). Returns [B, N] fp32.

    Computes in fp32 whatever the input dtype, one block of queries at a time.
    """
    _check(q, k, lse)
    b, h, n, _ = q.shape
    kf = k.float()
    mass = torch.zeros(b, h, n, dtype=torch.float32, device=q.device)
    rows = max(1, TILE_ELEMENTS // max(1, b * h * n))
    for start in range(0, n, rows):
        scores = torch.matmul(q[:, :, start : start + rows].float(), kf.transpose(-1, -2)) * scale
        mass += torch.exp(scores - lse[:, :, start : start + rows, None].float()).sum(dim=2)
    return mass.mean(dim=1)


def _torch_supports(q, k, lse, scale) -> list[str]:
    return []


BACKENDS = (Backend("torch", lambda: [], _torch_supports, attention_mass_ref),)


def attention_mass(q, k, lse, scale, *, backend: str = "auto") -> torch.Tensor:
    """Per-key attention mass [B, N] (fp32) of self-attention with queries/keys [B, H, N, D].

    `lse` is the per-row log-sum-exp of the scaled scores, as SDPA returns it ([B, H, N]).
    """
    _check(q, k, lse)
    impl = dispatch("attention_mass", BACKENDS, backend, (q, k, lse, scale))
    return impl(q, k, lse, scale)


__all__ = ["attention_mass", "attention_mass_ref", "BACKENDS", "check_requested"]
