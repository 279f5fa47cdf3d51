"""Flux (FluxPipeline): `pipe.transformer` a FluxTransformer2DModel called on packed latents
`hidden_states` [B, L, 4C] (each token a 2x2 patch of the [B, C, 2h, 2w] latent, in the order of
FluxPipeline._pack_latents) with `img_ids` [L, 3] (row and column of each token in columns 1 and 2),
text `encoder_hidden_states`, `txt_ids`, `pooled_projections`, `timestep` (the scheduler's timestep
/ 1000) and, for guidance-distilled models, `guidance`.

No CFG batch: Flux-dev is guidance distilled, so every model call is one branch (cond) and SAG
guides its rows: `out = o + s * (o - o_degraded)`. The noise level is read from the scheduler's
sigmas at its step index (FluxPipeline sets `begin_index` to 0 before its loop; a call made by hand
outside a pipeline loop must set one too: the transformer's `timestep` is not the scheduler's).

True CFG (`true_cfg_scale > 1` with a negative prompt): FluxPipeline then makes a second, separate
model call per step for the negative prompt and combines them as `neg + w * (pos - neg)`. Guiding each
call on its own rows would extrapolate SAG by w; sagfast joins the two calls into one [uncond, cond]
batch instead (`GuidedCall.sequential_step`, as Wan's CFG), so SAG guides the unconditional branch:
`neg + w * (pos - neg) + s * (neg - o_degraded)`.

Capture layer "mid": the joint attention of the double-stream block in the middle,
transformer_blocks[N // 2].attn (single-stream blocks get text and image as one sequence with no
marker of where the image starts: not offered). Text tokens come FIRST there; the capture processor
(sagfast.attention.processors.FluxCaptureProcessor, after RoPE) takes the mass of the image keys received from
the image queries, each query's softmax over all keys. The map is the packed token grid (h, w), read
from `img_ids`; nearest upsampling lays it onto the 2h x 2w latent, each token over its 2x2 patch.
"""

from __future__ import annotations

import weakref

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from sagfast.attention.processors import FluxCaptureProcessor
from sagfast.families.base import Family, true_cfg

# id(img_ids) -> (weak reference, version or None, (h, w)): the grid is read on the host once per
# img_ids tensor (one per pipeline call), not once per step.
_GRIDS: dict = {}


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def token_grid(img_ids: torch.Tensor) -> tuple[int, int]:
    """(h, w) of the packed token grid that `img_ids` ([L, 3], or the deprecated [B, L, 3]) numbers
    row-major; raises when the ids are not such a grid."""
    if img_ids.dim() == 3:
        img_ids = img_ids[0]
    key = id(img_ids)
    hit = _GRIDS.get(key)
    if hit is not None and hit[0]() is img_ids and hit[1] == _version(img_ids):
        return hit[2]
    ids = img_ids.detach().to("cpu", torch.float64).round().long()
    rows, cols = ids[:, 1], ids[:, 2]
    h = int(rows.max() - rows.min()) + 1
    w = int(cols.max() - cols.min()) + 1
    grid_rows = rows.min() + torch.arange(h).repeat_interleave(w)
    grid_cols = cols.min() + torch.arange(w).repeat(h)
    if h * w != ids.shape[0] or not (torch.equal(rows, grid_rows) and torch.equal(cols, grid_cols)):
        raise ValueError(
            f"SAG reads Flux's token grid from img_ids, which must number a row-major h x w grid (rows in column 1, "
            f"columns in column 2) of the {ids.shape[0]} image tokens; these do not"
        )
    if len(_GRIDS) >= 16:
        for k in [k for k, v in _GRIDS.items() if v[0]() is None] or [next(iter(_GRIDS))]:
            del _GRIDS[k]
    _GRIDS[key] = (weakref.ref(img_ids), _version(img_ids), (h, w))
    return h, w


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h*w, 4C] -> [B, C, 2h, 2w] (FluxPipeline._unpack_latents)."""
    b, _, c4 = x.shape
    return x.reshape(b, h, w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, 2 * h, 2 * w)


def pack(image: torch.Tensor) -> torch.Tensor:
    """[B, C, 2h, 2w] -> [B, h*w, 4C] (FluxPipeline._pack_latents)."""
    b, c, hh, ww = image.shape
    return image.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (hh // 2) * (ww // 2), c * 4)


def double_stream_layers(model) -> list[str]:
    return [f"transformer_blocks.{i}.attn" for i in range(len(model.transformer_blocks))]


class FluxFamily(Family):
    name = "Flux"
    attribute = "transformer"
    model_class = "FluxTransformer2DModel"
    pipelines = ("FluxPipeline",)
    sample_argument = "hidden_states"

    def problems(self, pipe) -> list[str]:
        problems = super().problems(pipe)
        if problems:
            return problems
        model = getattr(pipe.transformer, "_orig_mod", pipe.transformer)
        if model.config.patch_size != 1 or model.config.in_channels % 4:
            return [
                f"its transformer takes patch_size={model.config.patch_size}, in_channels={model.config.in_channels}; "
                "SAG knows FluxPipeline's 2x2 packing (patch_size 1, in_channels 4 * latent channels)"
            ]
        return []

    unselectable_layers = (
        "its attention modules are FluxAttention, which diffusers' pag_applied_layers matching does not select "
        "(diffusers has no Flux pipeline for a term on chosen layers), and its single-stream blocks do not say "
        "where the image tokens start"
    )

    def cfg_chunks(self, pipe, arguments: dict) -> int:
        return 1  # guidance distilled: each model call is one branch

    def sequential_cfg(self, pipe, attribute: str, arguments: dict):
        """True CFG: the call's true_cfg_scale when it is > 1 and the call has a negative prompt."""
        return true_cfg(arguments)

    def resolve_layer(self, model, layers: str):
        original = getattr(model, "_orig_mod", model)
        modules = dict(original.named_modules())
        allowed = double_stream_layers(original)
        if layers == "mid":
            name, where = f"transformer_blocks.{len(original.transformer_blocks) // 2}.attn", "the middle double-stream block"
        else:
            name, where = (f"{layers}.attn" if f"{layers}.attn" in modules else layers), repr(layers)
        if name not in allowed or name not in modules:
            raise ValueError(
                f"SAG needs the joint attention of a double-stream block at {where} ({name}), and this "
                f"{type(original).__name__} has none there (single-stream blocks are not offered: their sequence does "
                f"not say where the image tokens start). Layers it has: {allowed[:8] or 'none'}" + (" ..." if len(allowed) > 8 else "")
            )
        return name, modules[name], original, 1

    def map_size(self, call: dict):
        return token_grid(call["img_ids"])

    def to_image(self, x: torch.Tensor, call: dict) -> torch.Tensor:
        return unpack(x, *token_grid(call["img_ids"]))

    def to_model_input(self, image: torch.Tensor, call: dict) -> torch.Tensor:
        return pack(image)

    def capture_processor(self, guide: slice, backend: str, xformers: bool, threshold: float):
        return FluxCaptureProcessor(guide, backend, xformers, threshold)

    def wrap_output(self, out):
        return Transformer2DModelOutput(sample=out)
