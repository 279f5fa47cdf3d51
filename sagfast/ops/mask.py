"""SAG mask: keys that receive more than `threshold` attention, laid out on the layer's (h, w) map."""

from __future__ import annotations

import math

import torch


def sag_mask_ref(mass: torch.Tensor, threshold: float, hw: tuple) -> torch.Tensor:
    """mass: [B, N] -> bool [B, h, w] with `mass > threshold`.

    `hw` is the layer's true spatial map (from the block's input), never guessed from N: a non-square
    latent has h != w, and N = h * w has several factorizations.
    """
    return to_map(mass, hw, "mass") > threshold


def to_map(per_key: torch.Tensor, hw: tuple, name: str = "mask") -> torch.Tensor:
    """[B, N] per-key values -> [B, h, w] on the layer's map (keys are in row-major pixel order), or
    [B, t, h, w] for a video layer's (t, h, w) grid (frame, row, column order)."""
    grid = tuple(int(n) for n in hw)
    size = math.prod(grid)
    if per_key.dim() != 2 or per_key.shape[1] != size:
        shown = "x".join(map(str, grid))
        raise ValueError(f"{name} must be [B, {'*'.join('thw'[-len(grid) :])}] = [B, {size}] for map {shown}; got {tuple(per_key.shape)}")
    return per_key.reshape(per_key.shape[0], *grid)


def upsample_index(size_in: int, size_out: int, device=None) -> torch.Tensor:
    """Nearest-neighbour source index floor(i * in / out) in exact integer arithmetic."""
    return torch.div(torch.arange(size_out, device=device) * size_in, size_out, rounding_mode="floor")


def upsample_mask_ref(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, h, w] -> [B, 1, H, W], nearest by index; the same mask for every channel."""
    rows = upsample_index(mask.shape[1], height, mask.device)
    cols = upsample_index(mask.shape[2], width, mask.device)
    return mask[:, rows][:, :, cols].unsqueeze(1)
