"""A setting of sagfast's configuration, declared by the term (or CFG rule, or the engine) it belongs
to, and the checks every entry point shares.

A term's file (sagfast/terms/<name>.py) lists its `Setting`s: name, default, check, documentation,
and what it is to the other entry points (one value per image of a call, a guidance interval, its
name in a server request). `sagfast.config.SAGConfig` is made from every term's settings, the server's
request schema from the per-image ones, `sagfast demo`'s flags and the modular guider's fields
likewise: no other file names a term's field.

Each check takes the field's name (so that an entry point with other names, such as the modular
guider, quotes its own) and the value, and returns (the value as stored, None) or (None, a message
naming the field, what is wrong and the value given). Numbers arrive from JSON bodies, numpy and
torch: any real number (a 0-d tensor or array included) is taken and stored as a Python float; NaN
and infinity are refused (a NaN scale makes NaN images, a NaN threshold switches SAG off silently).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable

import numpy as np
import torch

FULL = (0.0, 1.0)
"""The interval of every step."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One field of the configuration."""

    name: str
    default: Any
    check: Callable
    """`check(name, value) -> (stored value, None) | (None, problem)`."""
    doc: str
    per_image: bool = False
    """Takes one number for every image or one value per image of the call (a term's scale)."""
    interval: bool = False
    """A guidance interval (start, stop) of the call's steps."""
    public_name: str | None = None
    """Its name in a server request and a CLI flag, where it is not `name` (`scale` is `sag_scale`)."""
    served_default: Any = None
    """A server request's default where it is not `default` (CFG: 3.0, where the config's None means
    "the pipeline's guidance_scale")."""

    @property
    def public(self) -> str:
        return self.public_name or self.name

    @property
    def request_default(self):
        return self.default if self.served_default is None else self.served_default


def scale(name: str, doc: str, default: float = 0.0, **options) -> Setting:
    """A term's scale: >= 0, one per image or one for all, 0 (the default) is off."""
    return Setting(name, default, check_scales, doc, per_image=True, **options)


def interval(name: str, doc: str) -> Setting:
    """A term's guidance interval, every step by default."""
    return Setting(name, FULL, check_interval, doc, interval=True)


def refresh(term: str) -> Setting:
    """A term's refresh interval `<term>_refresh` (every term has one: `sagfast.terms.base.Term` adds it
    to each term's settings from its name)."""
    return Setting(
        f"{term}_refresh",
        1,
        check_refresh,
        (
            f"Term refresh of {term.upper()}: inside its interval its rows run at its first step and then every "
            "k-th step; the steps between run none of its rows (no model rows, no cost) and add its scale times the "
            "difference `o_source - o_term` of the last step whose rows ran (per image, each image's own scale applied "
            "to it). An approximation that saves (k - 1) / k of the term's rows. 1 (the default): every step, "
            "exactly as without it. Not with CUDA graphs (their steps then run eagerly)."
        ),
    )


def real(name: str, default: float, doc: str, **bounds) -> Setting:
    """A finite number, within `bounds` (check_real's low, low_ok, high)."""
    return Setting(name, default, functools.partial(check_real, **bounds), doc)


def choice(name: str, default: str, allowed, doc: str) -> Setting:
    """One of `allowed` (a tuple, or a function giving it when the check runs: a registry filled later)."""
    return Setting(name, default, functools.partial(check_choice, allowed=allowed), doc)


def _real(value) -> tuple:
    """(value as a finite Python float, None), or (None, why it is not one)."""
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        if value.ndim != 0:
            return None, f"must be a real number (a 0-d real {'tensor' if torch.is_tensor(value) else 'array'} is accepted)"
        value = value.item()  # a bool or complex one becomes a Python bool or complex, refused below
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None, "must be a real number"
    value = float(value)
    if not math.isfinite(value):
        return None, "must be finite"
    return value, None


def _problem(name: str, value, why: str | None) -> str | None:
    return None if why is None else f"{name} {why}, got {value!r}"


# The checks below are shared by every entry point that takes these settings (SAGConfig, and
# sagfast.guiders.SelfAttentionGuidance under its own field names), so that one rule holds everywhere.
# Each returns (the value as stored, None), or (None, a message naming the field, what is wrong and the
# value given).


def check_real(name: str, value, low: float | None = None, low_ok: bool = True, high: float | None = None) -> tuple:
    """A finite real number (Python, numpy, or a 0-d tensor or array), as a Python float, in [low, high]
    (`low_ok=False`: above `low`)."""
    number, why = _real(value)
    if why is None and low is not None and (number < low or (number == low and not low_ok)):
        why = f"must be {'>=' if low_ok else '>'} {low:g}"
    if why is None and high is not None and number > high:
        why = f"must be in [{low:g}, {high:g}]"
    return (number if why is None else None), _problem(name, value, why)


def check_scales(name: str, value) -> tuple:
    """A scale: a real number >= 0 as a Python float, or one per image (a non-empty sequence, 1-D tensor or
    1-D numpy array of them) as a tuple of Python floats."""
    entries = value.tolist() if (torch.is_tensor(value) or isinstance(value, np.ndarray)) and value.ndim == 1 else value
    if isinstance(entries, (list, tuple)):
        if not entries:
            return None, _problem(name, value, "must be a number or a non-empty sequence of numbers (one per image)")
        parsed = [_real(v) for v in entries]
        why = next((why for _, why in parsed if why is not None), None)
        if why is None and min(v for v, _ in parsed) < 0:
            why = "must be >= 0"
        if why is not None:
            return None, _problem(name, value, f"entries {why}")
        return tuple(v for v, _ in parsed), None
    number, why = _real(value)
    if why is None and number < 0:
        why = "must be >= 0"
    if why is not None and why.startswith("must be a real"):
        why = f"{why} (or one value per image)"
    return (number if why is None else None), _problem(name, value, why)


def check_interval(name: str, value) -> tuple:
    """(start, stop), two fractions of the denoising steps with 0 <= start <= stop <= 1, as Python floats."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None, _problem(name, value, "must be (start, stop), two fractions of the denoising steps")
    (start, why_start), (stop, why_stop) = _real(value[0]), _real(value[1])
    if why_start or why_stop:
        return None, _problem(name, value, f"entries {why_start or why_stop}")
    if not 0.0 <= start <= stop <= 1.0:
        return None, _problem(name, value, "must have 0 <= start <= stop <= 1")
    return (start, stop), None


def check_choice(name: str, value, allowed) -> tuple:
    """One of the strings `allowed` (a tuple, or a function that gives it now)."""
    allowed = tuple(allowed()) if callable(allowed) else allowed
    if isinstance(value, str) and value in allowed:
        return value, None
    return None, _problem(name, value, f"must be one of {allowed}")


def check_odd_int(name: str, value) -> tuple:
    """An odd int >= 1 (a blur window), as a Python int."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1 and value % 2 == 1:
        return int(value), None
    return None, _problem(name, value, "must be an odd int >= 1")


def check_layer(name: str, value) -> tuple:
    """The self-attention layer SAG reads its map from: "mid" or a module name."""
    if isinstance(value, str) and value:
        return value, None
    return None, _problem(name, value, 'must be "mid" or the module name of a self-attention layer')


def check_layers(name: str, value) -> tuple:
    """Layer identifiers, matched as diffusers' `pag_applied_layers`: a string, or a non-empty list of
    them, as a tuple."""
    layers = (value,) if isinstance(value, str) else value
    if isinstance(layers, (list, tuple)) and layers and all(isinstance(x, str) and x for x in layers):
        return tuple(layers), None
    return None, _problem(name, value, 'must be a non-empty string or list of strings ("mid", "up_blocks.0")')


def check_optional_scales(name: str, value) -> tuple:
    """None, or a scale as check_scales takes it."""
    return (None, None) if value is None else check_scales(name, value)


def check_optional_real(name: str, value) -> tuple:
    """None, or a finite real number; 0 is stored as None (nothing to apply)."""
    if value is None:
        return None, None
    number, problem = check_real(name, value)
    return (number or None, None) if problem is None else (None, f"{problem} (or None)")


def check_count(name: str, value) -> tuple:
    """An int >= 0, as a Python int."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0:
        return int(value), None
    return None, _problem(name, value, "must be an int >= 0")


def check_refresh(name: str, value) -> tuple:
    """An int >= 1 (a term's refresh interval in steps), as a Python int."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return int(value), None
    return None, _problem(name, value, "must be an int >= 1 (steps between the term's own rows)")


def check_bool(name: str, value) -> tuple:
    if isinstance(value, bool):
        return value, None
    return None, _problem(name, value, "must be True or False")


def check_blocks(name: str, value) -> tuple:
    """Transformer blocks: a block index, "mid", a block name, or a non-empty list of them, as a tuple."""
    blocks = (value,) if isinstance(value, (str, numbers.Integral)) and not isinstance(value, bool) else value
    ok = lambda x: (isinstance(x, str) and x) or (isinstance(x, numbers.Integral) and not isinstance(x, bool))  # noqa: E731
    if isinstance(blocks, (list, tuple)) and blocks and all(ok(x) for x in blocks):
        return tuple(x if isinstance(x, str) else int(x) for x in blocks), None
    return None, _problem(name, value, 'must be a block index, "mid", a block name, or a non-empty list of them')
