"""The HTTP API's request body, validated by schema (pydantic), the error body, and the server's limits.

A request names its model and its own guidance settings. Unknown fields, wrong types, NaN or infinite
numbers, a scale outside 0..`MAX_SCALE`, steps or a size over the server's limits are refused with
422 naming the field (`sagfast.serving.app` writes that answer itself: FastAPI's default handler
echoes the input and cannot encode a NaN). What the client sent is never echoed whole: a field name
or value is quoted as at most `QUOTE_CHARS` characters (`quote`).

The per-image guidance fields are sagfast's per-image settings (`sagfast.config.PER_IMAGE`), each
under its public name and with its served default, as its term declares them
(`sagfast.core.settings.Setting`): a term the engine gains is served with it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from sagfast.config import FIELDS, PER_IMAGE

MODES = ("exact", "batched")
MAX_SCALE = 100.0
"""Every scale a request sets is in [0, MAX_SCALE]: far above any useful setting (CFG is used up to
~30), far below what overflows the arithmetic in half precision."""
QUOTE_CHARS = 64
"""At most this much of a client's text (a field name, a model name) is quoted back in an error."""
DEFAULT_STEPS = 10


def request_name(setting: str) -> str:
    """A per-image setting's name in a request (`scale` is `sag_scale`, `cfg_scale` `guidance_scale`)."""
    return FIELDS[setting].public


def quote(text) -> str:
    """`text` as repr, cut to QUOTE_CHARS characters with how much was left out."""
    text = str(text)
    if len(text) <= QUOTE_CHARS:
        return repr(text)
    return f"{text[:QUOTE_CHARS]!r}... ({len(text)} characters)"


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server accepts and how it batches. Each field is a `sagfast serve` option."""

    max_steps: int = 50
    """Steps above this are refused (422): a request's cost grows with its steps. A request that
    omits `steps` gets min(10, max_steps)."""
    max_size: int = 1024
    """Image side in pixels above this is refused (422). A request that omits `size` gets its model's
    native size, or max_size (rounded down to a multiple of 8) where that is smaller; a model that
    makes one size only (the digit models) and makes it larger than max_size is refused at start."""
    max_batch_size: int = 8
    """Requests per model call at most (Ray Serve's batch size); 1 turns batching off."""
    batch_wait_ms: float = 10.0
    """How long a batch waits for more requests once its first has come: latency for throughput."""
    max_queue: int = 64
    """Requests a replica holds (waiting or running) before it answers 503 with Retry-After."""
    group_by: str = "shape"
    """Which requests share a call: "shape" (model, steps, size, mode: any guidance settings, sagfast's
    per-image settings), or "settings" (also every guidance setting, as other serving engines batch)."""

    @property
    def default_steps(self) -> int:
        return min(DEFAULT_STEPS, self.max_steps)


class ErrorItem(BaseModel):
    field: str = Field(description='the request field at fault ("body" when the body is not a JSON object)')
    message: str = Field(description="what was wrong and what is accepted")


class ErrorBody(BaseModel):
    """Every error answer of the server (4xx and 5xx)."""

    error: str = Field(description='what went wrong; "invalid request" for a 422')
    errors: list[ErrorItem] | None = Field(default=None, description="422 only: one entry per field at fault")


class ImageRequestBase(BaseModel):
    """POST /v1/images. Exactly one of `prompt` (diffusers text-to-image models) and `label` (the
    digit models) names what to draw."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    model: str = Field(description="a name from GET /v1/models")
    prompt: str | None = Field(default=None, min_length=1, max_length=2000, description="text-to-image models")
    label: int | None = Field(default=None, ge=0, le=9, description="digit models: the digit to draw")
    seed: int = Field(default=0, ge=0, lt=2**63, description="the image's own generator seed")
    mode: Literal["exact", "batched"] = Field(default="exact", description="SAG's mode")

    @model_validator(mode="after")
    def _one_subject(self):
        if (self.prompt is None) == (self.label is None):
            raise ValueError("give exactly one of `prompt` (text-to-image models) and `label` (digit models)")
        return self

    def settings(self) -> dict:
        """The per-image guidance settings, by the engine's field names."""
        return {setting: getattr(self, request_name(setting)) for setting in PER_IMAGE}


def scale_field(setting: str):
    """A per-image setting as a request field: a number in 0..MAX_SCALE, its served default."""
    default = FIELDS[setting].request_default
    description = f"this image's {setting} in sagfast's terms, 0..{MAX_SCALE:g} (default {default:g}; a term's 0 is off, CFG's <= 1)"
    return (float, Field(default=default, ge=0.0, le=MAX_SCALE, description=description))


def request_model(limits: Limits) -> type:
    """The request schema with this server's limits on steps and size (they show in /docs)."""
    return create_model(
        "ImageRequest",
        __base__=ImageRequestBase,
        steps=(
            int,
            Field(default=limits.default_steps, ge=1, le=limits.max_steps, description=f"denoising steps, 1..{limits.max_steps}"),
        ),
        size=(
            int | None,
            Field(
                default=None,
                ge=8,
                le=limits.max_size,
                multiple_of=8,
                description=f"image side in pixels, 8..{limits.max_size} (default: the model's, at most {limits.max_size})",
            ),
        ),
        **{request_name(setting): scale_field(setting) for setting in PER_IMAGE},
    )


def field_errors(errors: list) -> list:
    """pydantic's errors as [{"field", "message"}], JSON-safe and short: the input is not echoed (it
    may hold a NaN, or a megabyte), a field name is quoted at most QUOTE_CHARS long, and an error of
    the body as a whole (not JSON, not an object) names the field `body`."""
    out = []
    for error in errors:
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        if error.get("type") in ("json_invalid", "model_attributes_type", "dict_type", "model_type"):
            location = []  # the decoder's character offset, or the body itself: the body is at fault
        field = ".".join(location)
        field = (field if len(field) <= QUOTE_CHARS else quote(field)) or "body"
        message = error.get("msg", "invalid")
        if error.get("type") == "extra_forbidden":
            message = "unknown field; the accepted fields are in the OpenAPI schema (/docs)"
        out.append({"field": field, "message": message})
    return out


__all__ = ["ErrorBody", "Limits", "MAX_SCALE", "MODES", "field_errors", "quote", "request_model"]
