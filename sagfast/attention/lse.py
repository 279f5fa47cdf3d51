"""Attention with its log-sum-exp: the per-row `lse = log sum_j exp(q . k_j * scale)` SDPA computes
anyway, asked of the fused kernels that return it (CPU flash, CUDA flash or memory-efficient,
xformers) instead of a second pass; a chunked fallback where none does. The attention mass
(sagfast.ops.attention_mass) is exp(q . k * scale - lse) summed over rows, so with the lse it needs q
and k only, never the N x N map.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def lse_chunked(q, k, scale, bias=None):
    """Row log-sum-exp in fp32, a block of queries at a time (for devices SDPA gives no lse on); `bias`
    an additive key mask broadcast to [B, H, N, Nk] (a key padding mask: [B, 1, 1, Nk])."""
    b, h, n, _ = q.shape
    # A block of scores is 32 MiB in fp32 (256 MiB on a GPU, where fewer, larger matmuls pay).
    budget = 1 << (26 if q.device.type == "cuda" else 23)
    rows = max(1, budget // max(1, b * h * k.shape[2]))
    bias = 0.0 if bias is None else bias.float()
    keys = k.float().transpose(-1, -2)
    parts = [torch.logsumexp(torch.matmul(q[:, :, i : i + rows].float(), keys) * scale + bias, dim=-1) for i in range(0, n, rows)]
    return torch.cat(parts, dim=2)


@functools.cache
def _flash_runs_on(device: torch.device) -> bool:
    """Whether torch's flash-attention kernel exists in this build and runs on this GPU (sm80+)."""
    return torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def key_bias(keep: torch.Tensor, dtype) -> torch.Tensor:
    """A boolean key mask (True: attended) as the additive mask SDPA takes: 0 or -inf."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))


def sdpa_with_lse(q, k, v, scale: float, bias=None):
    """(out, lse) of softmax attention; q, k, v [B, H, N, D]; lse [B, H, N] fp32 (natural log). `bias`:
    an additive key mask ([B, 1, 1, Nk], 0 or -inf: a text padding mask) on CPU tensors, or None (on a
    GPU, `SAGCaptureProcessor.attend` takes a masked layer's lse for the guide rows only)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        return out, lse
    if bias is not None:
        raise ValueError(f"sdpa_with_lse takes a key mask on CPU tensors only, got {q.device.type} tensors")
    if q.device.type == "cuda":
        d = q.shape[-1]
        if q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256 and _flash_runs_on(q.device):
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
            return res[0], res[1]
        res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
        return res[0], res[1][:, :, : q.shape[2]]
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out, lse_chunked(q, k, scale)


def xformers_reasons(q=None) -> list:
    """Why the capture layer cannot take its output and lse from xformers (empty when it can)."""
    why = []
    try:
        import xformers.ops.fmha  # noqa: F401
    except Exception as e:  # not installed, or built for another torch
        why.append(f"xformers is not importable ({type(e).__name__}: {e})")
    if q is not None and q.device.type != "cuda":
        why.append(f"xformers runs on CUDA tensors, got {q.device.type}")
    return why


def xformers_with_lse(q, k, v, scale: float):
    """(out, lse) from xformers' memory-efficient forward; q, k, v [B, H, N, D] as sdpa_with_lse."""
    from xformers.ops import fmha

    out, lse = fmha.memory_efficient_attention_forward_requires_grad(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=None, p=0.0, scale=scale
    )
    # xformers pads the lse's query dim up to its block size.
    return out.transpose(1, 2), lse[:, :, : q.shape[2]].float()
