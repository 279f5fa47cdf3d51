"""Attention mass: how much attention each key receives, averaged over heads.

For one sample, per head `P = softmax(q k^T * scale)` over keys; key j receives `sum_i P[i, j]`; the
mass is the mean of that over heads. Rows of P sum to 1, so the mass averages exactly 1 over keys.
SDPA already returns each row's log-sum-exp (lse), so `P[i, j] = exp(q_i . k_j * scale - lse_i)` can be
recomputed a block of queries at a time: memory stays O(B*H*N) plus one bounded tile, never N x N.
"""

from __future__ import annotations

import math

import torch

from sagfast.ops import _cpp, _triton
from sagfast.ops._dispatch import Backend, check_requested, dispatch

LOG2E = 1.4426950408889634

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


FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_reasons(q, k, lse) -> list[str]:
    out = []
    if q.dtype != k.dtype:
        out.append(f"q and k must share one dtype (q {q.dtype}, k {k.dtype})")
    if q.dtype not in FLOAT_TYPES:
        out.append(f"q/k dtype {q.dtype} is not one of fp32, fp16, bf16")
    if not lse.dtype.is_floating_point:
        out.append(f"lse must be floating point, got {lse.dtype}")
    if len({q.device, k.device, lse.device}) > 1:
        out.append(f"q, k and lse must be on one device (got {q.device}, {k.device}, {lse.device})")
    return out


# --- Triton ------------------------------------------------------------------------------------------

MAX_TRITON_HEAD_DIM = 256


def _triton_supports(q, k, lse, scale, threshold=None) -> list[str]:
    out = _triton.device_reasons(q, k, lse) + _dtype_reasons(q, k, lse)
    if q.shape[-1] > MAX_TRITON_HEAD_DIM:
        out.append(f"head dim {q.shape[-1]} > {MAX_TRITON_HEAD_DIM} (a [BLOCK_N, head dim] tile of keys stays in registers)")
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        out.append("bf16 under the Triton interpreter is not trusted (it computes bf16 arithmetic wrongly); bf16 is GPU-only")
    return out


def _triton_blocks(n: int, d: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D). The head dim is padded to a power of 2 (>= 16 for tl.dot) and the
    tail masked. On a GPU the key tile [BLOCK_N, BLOCK_D] lives in registers, so wide heads get fewer
    keys per program; under the interpreter each program costs ~ms whatever its size, so tiles are large."""
    block_d = max(16, _triton.next_pow2(d))
    if device.type == "cpu":
        # Interpreter: N = 1024, H = 8 takes ~18 s with 128 x 128 tiles and ~1.2 s with 1024 x 256.
        return min(1024, max(16, _triton.next_pow2(n))), min(256, max(16, _triton.next_pow2(n))), block_d
    return 64, (64 if block_d <= 128 else 32), block_d


@torch.library.custom_op("sagfast::attention_mass_triton", mutates_args=())
def attention_mass_triton(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mass [B, N] fp32, mask [B, N] bool = mass > threshold) with the Triton kernels."""
    import triton

    kern = _triton.kernels("attention_mass")
    b, h, n, d = q.shape
    part = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    block_m, block_n, block_d = _triton_blocks(n, d, q.device)
    lowp = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    with _triton.on_device(q):
        kern.attention_mass_partial_kernel[(triton.cdiv(n, block_n), b * h)](
            q,
            k,
            lse,
            part,
            *q.stride(),
            *k.stride(),
            *lse.stride(),
            *part.stride(),
            h,
            n,
            d,
            float(scale) * LOG2E,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            LOWP_DOT=lowp,
        )
        mass = torch.empty(b, n, dtype=torch.float32, device=q.device)
        mask = torch.empty(b, n, dtype=torch.bool, device=q.device)
        block = min(1024, max(16, _triton.next_pow2(n)))
        kern.attention_mass_reduce_kernel[(triton.cdiv(n, block), b)](part, mass, mask, *part.stride(), h, n, float(threshold), BLOCK=block)
    return mass, mask


@attention_mass_triton.register_fake
def _(q, k, lse, scale, threshold):
    b, _, n, _ = q.shape
    return q.new_empty((b, n), dtype=torch.float32), q.new_empty((b, n), dtype=torch.bool)


# --- C++ ---------------------------------------------------------------------------------------------


def _cpp_supports(q, k, lse, scale, threshold=None) -> list[str]:
    if q.device.type == "cuda":
        # A one-thread-per-key CUDA C++ kernel measured 8.67 ms against Triton's 0.21 ms (H200, B2 H8
        # N4096 D64, fp16) and was removed: docs/design.md, "The attention mass on CUDA".
        return ["the C++ attention mass runs on CPU tensors only; on CUDA the kernel is Triton's (backend='triton')"]
    return _cpp.device_reasons(q, k, lse) + _dtype_reasons(q, k, lse)


def _cpp_run(q, k, lse, scale, threshold):
    return torch.ops.sagfast.attention_mass(q, k, lse, float(scale), float(threshold))


def _torch_run(q, k, lse, scale, threshold):
    mass = attention_mass_ref(q, k, lse, scale)
    return mass, mass > threshold


def _triton_run(q, k, lse, scale, threshold):
    return attention_mass_triton(q, k, lse, float(scale), float(threshold))


BACKENDS = (
    Backend("triton", _triton.available, _triton_supports, _triton_run, _triton.auto_skip),
    Backend("cpp", _cpp.available, _cpp_supports, _cpp_run),
    Backend("torch", lambda: [], lambda *a: [], _torch_run),
)


def _key(q, k, lse):
    # Everything the backends' supports() look at: device, dtypes, head dim, interpreter mode.
    return (q.device, k.device, lse.device, q.dtype, k.dtype, lse.dtype, q.shape[-1], _triton.interpreting())


def attention_mass(q, k, lse, scale, *, backend: str = "auto", threshold: float | None = None):
    """Per-key attention mass [B, N] (fp32) of self-attention with queries/keys [B, H, N, D].

    `lse` is the per-row log-sum-exp of the scaled scores, as SDPA returns it ([B, H, N]). q and k may
    have any strides. With `threshold`, returns `(mass, mass > threshold)`, the mask from the same call.
    """
    _check(q, k, lse)
    impl = dispatch("attention_mass", BACKENDS, backend, (q, k, lse, scale), key=_key(q, k, lse))
    mass, mask = impl(q, k, lse, scale, math.inf if threshold is None else float(threshold))
    return mass if threshold is None else (mass, mask)


__all__ = ["attention_mass", "attention_mass_ref", "attention_mass_triton", "BACKENDS", "check_requested"]
