"""Classifier-free guidance as a rule: how each image's uncond and cond predictions become its guided
one when sagfast computes it (`SAGConfig.cfg_scale` given, or a `cfg_rule` other than "cfg").

A rule returns a base prediction and the (scale, positive, negative) terms to add to it; the engine
adds the other terms' (SAG, PAG, SEG) and runs them all as one combine. Plain CFG is
`o_u + g * (o_c - o_u)`: base o_u, one term. An image whose scale is <= 1 is guided without CFG: its
prediction is its cond row (a scale of exactly 1 on the term gives it).

With the pipeline's own CFG line (cfg_scale None, cfg_rule "cfg") no rule runs: the engine returns
`o[k] + terms` for both CFG halves and the pipeline applies its guidance_scale.
"""

from __future__ import annotations

import torch

from sagfast.core.settings import Setting, check_optional_scales, choice, interval


def row_scale(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-image scale [B] as fp32 [B, 1, ...] against `like`'s rows."""
    g = g.to(device=like.device, dtype=torch.float32)
    return g.reshape(-1, *([1] * (like.dim() - 1))).expand(like.shape[0], *([1] * (like.dim() - 1)))


RULES: dict = {}
"""`cfg_rule` name -> rule class: every subclass of CFGRule registers itself here when its module is
imported (sagfast.terms imports every module of this folder)."""


class CFGRule:
    """The interface (and plain CFG). Made per guided call: a rule may keep state between steps.

    A rule in its own file declares `name` (the `cfg_rule` value) and its `settings` (its knobs);
    CFG's own settings are here: the scale, the rule's name, the interval."""

    name = "cfg"
    scale_field = "cfg_scale"
    """The CFG scale's field (the server and the CLI hand it the pipeline's guidance scale)."""
    interval_field = "cfg_interval"
    rule_field = "cfg_rule"
    needs_index = False
    """Whether its combine depends on the step's index in the call (CFG-Zero*'s zero-init steps)."""
    settings = (
        Setting(
            "cfg_scale",
            None,
            check_optional_scales,
            (
                "Classifier-free guidance scale: None takes the pipeline call's `guidance_scale` and leaves the "
                "pipeline's own CFG line to apply it; a number, or one value per image, makes sagfast compute "
                "each image's guided prediction itself (the pipeline's line then gives it unchanged). An image "
                "with `cfg_scale <= 1` is guided without CFG (its guide branch is its cond row) while sharing the "
                "batch with CFG images; the call's `guidance_scale` must then be > 1 when any image uses CFG, so "
                "that the pipeline batches [uncond, cond]. Refuses the pipeline's `guidance_rescale > 0`."
            ),
            per_image=True,
            public_name="guidance_scale",
            served_default=3.0,
        ),
        choice(
            "cfg_rule",
            "cfg",
            lambda: tuple(RULES),
            (
                'How the uncond and cond predictions are combined: "cfg" (`o_u + g * (o_c - o_u)`) or the name of '
                "any other CFG rule, one file each in sagfast/terms/ (sagfast.config.CFG_RULES; each rule's file "
                "documents its formula and settings: apg, cfg_zero_star, tcfg, mambo, fdg, ...). Only the combine "
                'changes: no extra rows; every term (SAG, PAG, ...) adds to it. Anything but "cfg" refuses the '
                "pipeline's `guidance_rescale > 0`."
            ),
        ),
        interval(
            "cfg_interval",
            (
                "Guidance interval of CFG (Kynkaanniemi et al. 2024) as fractions of the call's denoising steps: step "
                "i of N is guided when `start <= i / N < stop`. Outside it only the conditional rows are run and "
                "returned for both CFG halves, so the pipeline's CFG line gives the conditional prediction at half "
                "the batch."
            ),
        ),
    )

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        RULES[cls.name] = cls

    def __init__(self, config):
        self.config = config

    def combine(self, o_u: torch.Tensor, o_c: torch.Tensor, g, index: int):
        """(base, terms) for fp32 predictions [B, ...] and the CFG scale `g` (a number or a [B] fp32
        tensor with 1 for every image guided without CFG); `index`: the step of the call."""
        return o_u, [(g, o_c, o_u)]

    def zero(self, index: int) -> bool:
        """Whether step `index` predicts zero (CFG-Zero*'s first steps)."""
        return False

    def graph_refusals(self) -> list[str]:
        return []


RULES[CFGRule.name] = CFGRule


# CFG's settings as the engine, the config and the guider read them: here, beside their declarations.


def owns(config) -> bool:
    """Whether sagfast computes the CFG combine itself (a rule other than plain CFG, or its own
    `cfg_scale`) instead of leaving it to the pipeline's CFG line."""
    return config.cfg_rule != CFGRule.name or config.cfg_scale is not None


def is_plain(config) -> bool:
    """Whether the rule is plain CFG (`o_u + g * (o_c - o_u)`)."""
    return config.cfg_rule == CFGRule.name


def rule_of(config) -> CFGRule:
    """The config's rule, made for one guided call."""
    return RULES[config.cfg_rule](config)


def interval_of(config) -> tuple:
    return config.cfg_interval


def scales_of(config):
    """The config's CFG scale: None (the pipeline's guidance_scale), a number, or one per image."""
    return config.cfg_scale


def refuse_rescale(config, rescale: float) -> None:
    """The pipeline's `guidance_rescale` rescales a prediction sagfast combined itself: refused."""
    if owns(config) and (rescale or 0) > 0:
        raise ValueError(
            f"guidance_rescale={rescale} cannot be applied when sagfast computes CFG itself "
            f"(cfg_scale={config.cfg_scale!r}, cfg_rule={config.cfg_rule!r}): the pipeline would rescale a "
            "prediction it no longer sees the parts of. Call with guidance_rescale=0, or leave cfg_scale None "
            'and cfg_rule "cfg".'
        )


def call_scale(config, chunks: int, pipeline_scale: float):
    """The CFG scale sagfast combines with: the config's where given (one per image: each at least 1,
    1 for the images without CFG), else the pipeline's (`pipeline_scale`). Raises when it asks for CFG
    in a call without its [uncond, cond] batch (`chunks` 1)."""
    g = config.cfg_scale if config.cfg_scale is not None else pipeline_scale
    if chunks == 1 and (max(g) if isinstance(g, tuple) else g) > 1:
        raise ValueError(
            f"cfg_scale {config.cfg_scale!r} asks for CFG, but this call runs without it (the pipeline "
            "batches [uncond, cond] only when the call's guidance_scale > 1): call with guidance_scale > 1 (any "
            "value: each image's cfg_scale applies), or give every image cfg_scale <= 1"
        )
    return tuple(max(x, 1.0) for x in g) if isinstance(g, tuple) else max(g, 1.0)
