"""The denoiser families sagfast guides, one module each, and how a pipeline's family is found."""

from __future__ import annotations

from sagfast.families.base import Family
from sagfast.families.cogvideox import CogVideoXFamily
from sagfast.families.dit import DigitDiTFamily, DiTFamily
from sagfast.families.flux import FluxFamily
from sagfast.families.hunyuan_video import HunyuanVideoFamily
from sagfast.families.ltx import LTXFamily
from sagfast.families.pixart import PixArtFamily
from sagfast.families.sd3 import SD3Family
from sagfast.families.unet import UNetFamily
from sagfast.families.unet2d import UnconditionalUNetFamily
from sagfast.families.wan import WanFamily

FAMILIES: tuple = (
    UNetFamily(),
    UnconditionalUNetFamily(),
    DiTFamily(),
    DigitDiTFamily(),
    PixArtFamily(),
    SD3Family(),
    FluxFamily(),
    CogVideoXFamily(),
    LTXFamily(),
    WanFamily(),
    HunyuanVideoFamily(),
)


def family_of(pipe) -> Family:
    """The family that knows `pipe`'s batch layout, once it is checked; a clear error for any other
    pipeline."""
    family = family_of_class(type(pipe))
    problems = family.problems(pipe)
    if problems:
        raise ValueError(f"sagfast cannot guide this {type(pipe).__name__}: " + "; ".join(problems))
    return family


def family_of_model(model) -> Family:
    """The family whose denoiser class `model` is (a torch.compile'd model through `_orig_mod`), for
    code that sees a denoiser without its pipeline (a diffusers guider)."""
    original = getattr(model, "_orig_mod", model)
    names = {cls.__name__ for cls in type(original).__mro__}
    for family in FAMILIES:
        if family.model_class in names:
            return family
    known = ", ".join(dict.fromkeys(family.model_class for family in FAMILIES))
    raise ValueError(f"sagfast does not know the denoiser {type(original).__name__}. Denoisers it guides: {known}")


def family_of_class(cls: type) -> Family:
    """The family that knows the batch layout of the pipeline class `cls`."""
    for family in FAMILIES:
        if family.claims(cls):
            return family
    known = ", ".join(name for family in FAMILIES for name in family.pipelines)
    raise ValueError(
        f"sagfast does not know the batch layout of {cls.__name__} (its model calls may batch more "
        f"than [uncond, cond], as PAG's [uncond, cond, perturbed] does), so it refuses to guide it rather "
        f"than mix samples. Pipelines it guides (and their subclasses): {known}"
    )


__all__ = ["FAMILIES", "Family", "family_of", "family_of_class", "family_of_model"]
