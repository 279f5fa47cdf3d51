"""The HTTP API's request body, validated by schema (pydantic), and the server's limits.

A request names its model and its own guidance settings. Unknown fields, wrong types, NaN or infinite
numbers, negative scales, steps or a size over the server's limits are refused with 422 naming the
field (`sagfast.serving.app` writes that answer itself: FastAPI's default handler echoes the input
and cannot encode a NaN).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

MODES = ("exact", "batched")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server accepts and how it batches. Each field is a `sagfast serve` option."""

    max_steps: int = 50
    """Steps above this are refused (422): a request's cost grows with its steps."""
    max_size: int = 1024
    """Image side in pixels above this is refused (422)."""
    max_batch_size: int = 8
    """Requests per model call at most (Ray Serve's batch size); 1 turns batching off."""
    batch_wait_ms: float = 10.0
    """How long a batch waits for more requests once its first has come: latency for throughput."""
    max_queue: int = 64
    """Requests a replica holds (waiting or running) before it answers 503 with Retry-After."""
    group_by: str = "shape"
    """Which requests share a call: "shape" (model, steps, size, mode: any guidance settings, sagfast's
    per-image settings), or "settings" (also every guidance setting, as other serving engines batch)."""


class ImageRequestBase(BaseModel):
    """POST /v1/images. Exactly one of `prompt` (diffusers text-to-image models) and `label` (the
    digit models) names what to draw."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    model: str = Field(description="a name from GET /v1/models")
    prompt: str | None = Field(default=None, min_length=1, max_length=2000, description="text-to-image models")
    label: int | None = Field(default=None, ge=0, le=9, description="digit models: the digit to draw")
    seed: int = Field(default=0, ge=0, lt=2**63, description="the image's own generator seed")
    size: int | None = Field(default=None, ge=8, multiple_of=8, description="image side in pixels (default: the model's)")
    guidance_scale: float = Field(default=3.0, ge=0.0, description="CFG scale; <= 1 is no CFG")
    sag_scale: float = Field(default=0.75, ge=0.0, description="SAG scale; 0 is off")
    pag_scale: float = Field(default=0.0, ge=0.0, description="PAG scale; 0 is off")
    seg_scale: float = Field(default=0.0, ge=0.0, description="SEG scale; 0 is off")
    mode: Literal["exact", "batched"] = Field(default="exact", description="SAG's mode")

    @model_validator(mode="after")
    def _one_subject(self):
        if (self.prompt is None) == (self.label is None):
            raise ValueError("give exactly one of `prompt` (text-to-image models) and `label` (digit models)")
        return self

    def settings(self) -> dict:
        """The per-image guidance settings (the engine's field names)."""
        return dict(cfg_scale=self.guidance_scale, scale=self.sag_scale, pag_scale=self.pag_scale, seg_scale=self.seg_scale)


def request_model(limits: Limits) -> type:
    """The request schema with this server's limits on steps and size (they show in /docs)."""
    return create_model(
        "ImageRequest",
        __base__=ImageRequestBase,
        steps=(int, Field(default=10, ge=1, le=limits.max_steps, description=f"denoising steps, 1..{limits.max_steps}")),
        size=(int | None, Field(default=None, ge=8, le=limits.max_size, multiple_of=8, description="image side in pixels")),
    )


def field_errors(errors: list) -> list:
    """pydantic's errors as [{"field", "message"}], JSON-safe (the input is not echoed: it may hold a NaN)."""
    out = []
    for error in errors:
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        out.append({"field": ".".join(location) or "body", "message": error.get("msg", "invalid")})
    return out


__all__ = ["Limits", "MODES", "field_errors", "request_model"]
