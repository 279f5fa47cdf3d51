"""One configuration object for everything sagfast does, each field with its trade-off.

`SAGConfig`'s fields are the engine's own (below) and every term's and CFG rule's `settings`, declared
in their files (sagfast/terms/): this module names none of them. `help(sagfast.SAGConfig)` lists them
all with their documentation.
"""

from __future__ import annotations

import dataclasses

from sagfast.core.settings import FULL, Setting, check_bool, choice
from sagfast.terms import RULES, SETTINGS, TERMS, cfg

MODES = ("exact", "batched")
BACKENDS = ("auto", "triton", "cpp", "torch")
ENGINE = (
    choice(
        "mode",
        "exact",
        MODES,
        (
            '"exact": two model calls per step (main on [uncond, cond], then degraded on B), the algorithm of the '
            'paper and of diffusers. "batched": one model call per step on [uncond, cond, degraded] (3B; with PAG '
            "[uncond, cond, perturbed, degraded], 4B), the degraded input built from the current input and the "
            "previous evaluation's eps and mask: one larger call instead of two sequential ones (faster where the "
            "model is not compute bound, or where per-call overhead dominates), an approximation whose quality "
            "cost the README reports. The first evaluation of each pipeline call (and after a change of batch or "
            "shape) is an exact step."
        ),
    ),
    choice(
        "backend",
        "auto",
        BACKENDS,
        (
            'Which implementation of the ops runs: "auto" (first of triton on CUDA, cpp, torch that supports the '
            'input), "triton", "cpp" or "torch" (the plain PyTorch reference). An explicit backend never falls '
            "back: it raises with its reasons."
        ),
    ),
    Setting(
        "cuda_graph",
        False,
        check_bool,
        (
            "Capture each guided step (model calls, attention mass, degrade, combine) in a CUDA graph, one per "
            "(input shapes, dtype, step variant), replayed on later steps and calls: removes the launch and "
            "Python overhead of the step (large for small batches) at the cost of memory for static buffers and "
            "one capture per new shape. CUDA tensors only; where capture is impossible (CPU tensors, "
            'mask="random", an op that synchronizes) the step runs eagerly with a warning.'
        ),
    ),
    choice(
        "exact_pag_pass",
        "main",
        ("main", "degraded"),
        (
            "Where the rows of the terms that do not need the main pass (PAG's and SEG's) go in exact mode when "
            'SAG runs too (two calls a step either way): "main" runs [main batch, perturbed] then [degraded] (3B '
            'then B rows with PAG), "degraded" runs [main batch] then [degraded, perturbed] (2B then 2B: a lower '
            "activation peak, and the second call is no longer a small one). bench `step` measures both."
        ),
    ),
)
"""The engine's own settings: how the terms' rows are laid out in model calls, and what runs them."""

FIELDS = {setting.name: setting for setting in (*TERMS[0].settings, *ENGINE, *SETTINGS)}
"""Every field of SAGConfig by name: the first term's (SAG's: its scale is the first field), the engine's,
then every other term's and rule's (a dict keeps SAG's where SETTINGS names them again)."""
PER_IMAGE = tuple(name for name, setting in FIELDS.items() if setting.per_image)
"""Fields that take one number for every image or one value per image of the call."""
INTERVALS = tuple(name for name, setting in FIELDS.items() if setting.interval)
"""Every guidance interval."""
CFG_RULES = RULES
"""`cfg_rule` names and their rules."""


class ConfigChecks:
    """SAGConfig's behaviour: every field checked (each by its setting's check) when it is made."""

    def __post_init__(self):
        problems = []
        for name, setting in FIELDS.items():
            value, problem = setting.check(name, getattr(self, name))
            if problem is not None:
                problems.append(problem)
            else:
                object.__setattr__(self, name, value)
        if problems:
            raise ValueError("invalid SAGConfig: " + "; ".join(problems))

    @property
    def owns_cfg(self) -> bool:
        """Whether sagfast computes the CFG combine itself instead of leaving it to the pipeline's line."""
        return cfg.owns(self)

    @property
    def has_intervals(self) -> bool:
        """Whether any term is limited to part of the steps (the step index must then be known)."""
        return any(getattr(self, name) != FULL for name in INTERVALS)

    @property
    def refreshes(self) -> bool:
        """Whether any term reuses its difference between steps (term refresh: the step index must be known)."""
        return any(getattr(self, term.refresh_field) != 1 for term in TERMS)

    @property
    def guides(self) -> bool:
        """Whether this config changes anything at all (else the model is called as it is)."""
        return any(term.requested(self) for term in TERMS) or self.owns_cfg or cfg.interval_of(self) != FULL


def document(fields: dict) -> str:
    lines = [
        "Settings of Self-Attention Guidance (Hong et al., ICCV 2023) and the guidance engine around it.",
        "",
        "Frozen: `sagfast.enable(pipe, config, **overrides)` makes a new one with `dataclasses.replace`.",
        "Each field is declared, checked and documented by its term's file (sagfast/terms/) or the engine.",
        "",
    ]
    for name, setting in fields.items():
        lines += [f"{name} = {setting.default!r}", f"    {setting.doc}", ""]
    return "\n".join(lines)


SAGConfig = dataclasses.make_dataclass(
    "SAGConfig",
    [(name, object, dataclasses.field(default=setting.default)) for name, setting in FIELDS.items()],
    bases=(ConfigChecks,),
    frozen=True,
    namespace={"__module__": __name__, "__doc__": document(FIELDS)},
)

__all__ = ["BACKENDS", "CFG_RULES", "ENGINE", "FIELDS", "INTERVALS", "MODES", "PER_IMAGE", "SAGConfig", "Setting", "TERMS"]
