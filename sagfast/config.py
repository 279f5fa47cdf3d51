"""One configuration object for everything sagfast does, each field with its trade-off."""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
import torch

from sagfast.terms.apg import APG
from sagfast.terms.cfg import CFGRule
from sagfast.terms.cfg_zero_star import CFGZeroStar
from sagfast.terms.pag import PAG
from sagfast.terms.sag import SAG
from sagfast.terms.seg import SEG
from sagfast.terms.stg import STG

MODES = ("exact", "batched")
BACKENDS = ("auto", "triton", "cpp", "torch")
MASKS = ("attention", "global", "random")
PAG_PASSES = ("main", "degraded")
STG_MODES = ("block", "attention")
FULL = (0.0, 1.0)
PER_IMAGE = ("scale", "pag_scale", "seg_scale", "stg_scale", "cfg_scale")
"""Fields that take one number for every image or one value per image of the call."""
TERMS = (SAG, PAG, SEG, STG)
"""The guidance terms a config can turn on (sagfast.terms), in the order their rows join a model call."""
CFG_RULES = {rule.name: rule for rule in (CFGRule, APG, CFGZeroStar)}
"""`cfg_rule` names and their rules."""
INTERVALS = ("cfg_interval", "sag_interval", "pag_interval", "seg_interval", "stg_interval")


@dataclasses.dataclass(frozen=True)
class SAGConfig:
    """Settings of Self-Attention Guidance (Hong et al., ICCV 2023).

    Frozen: `sagfast.enable(pipe, config, **overrides)` makes a new one with `dataclasses.replace`.
    """

    scale: float = 0.75
    """SAG scale `s` in `out = cfg + s * (o_guide - o_degraded) [+ PAG's term]`. The paper uses 0.1 to 1.0; diffusers'
    default is 0.75. Larger values sharpen structure more and start to over-saturate. 0 disables SAG
    (the wrapped UNet then makes exactly the plain pipeline's call). One number for every image, or one
    value per image of the call (a sequence, 1-D tensor or 1-D numpy array of batch x
    num_images_per_prompt values): images with different settings share one model call, each guided as
    if alone."""

    mode: str = "exact"
    """"exact": two model calls per step (main on [uncond, cond], then degraded on B), the algorithm of
    the paper and of diffusers. "batched": one model call per step on [uncond, cond, degraded] (3B;
    with PAG [uncond, cond, perturbed, degraded], 4B),
    the degraded input built from the current input and the previous evaluation's eps and mask: one
    larger call instead of two sequential ones (faster where the model is not compute bound, or where
    per-call overhead dominates), an approximation whose quality cost the README reports. The first
    evaluation of each pipeline call (and after a change of batch or shape) is an exact step."""

    threshold: float = 1.0
    """psi: a key is masked when the attention it receives, averaged over heads, exceeds this. The
    mean over keys is exactly 1, so 1.0 masks the keys that get more than their share."""

    blur_kernel_size: int = 9
    """Gaussian blur window (odd). Reflect padding needs latent height and width > kernel_size // 2."""

    blur_sigma: float = 1.0
    """Gaussian blur standard deviation in latent pixels."""

    blur_sigma_t: float = 0.0
    """Video: the blur's standard deviation over time, in latent frames. 0 (the default) blurs each frame
    in (h, w) only; > 0 blurs the predicted x0 over its frames as well (a window of `blur_kernel_size`
    frames, cut to 2T - 1 for T latent frames), in PyTorch (the fused ops are 2-D). Images ignore it."""

    layers: str = "mid"
    """Which self-attention layer the map is read from: "mid" (the first self-attention of the UNet's
    mid block, as in the paper and diffusers) or the module name of a self-attention layer, such as
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1" (higher-resolution layers cost more)."""

    backend: str = "auto"
    """Which implementation of the ops runs: "auto" (first of triton on CUDA, cpp, torch that
    supports the input), "triton", "cpp" or "torch" (the plain PyTorch reference). An explicit
    backend never falls back: it raises with its reasons."""

    cuda_graph: bool = False
    """Capture each guided step (model calls, attention mass, degrade, combine) in a CUDA graph, one
    per (input shapes, dtype, step variant), replayed on later steps and calls: removes the launch
    and Python overhead of the step (large for small batches) at the cost of memory for static
    buffers and one capture per new shape. CUDA tensors only; where capture is impossible (CPU
    tensors, mask="random", an op that synchronizes) the step runs eagerly with a warning."""

    mask: str = "attention"
    """Which pixels get blurred, the paper's ablation: "attention" (SAG), "global" (blur everything:
    blur guidance) or "random" (a random ~40% of pixels at the map's resolution)."""

    random_mask_ratio: float = 0.4
    """Fraction of map pixels blurred when mask="random"."""

    pag_scale: float = 0.0
    """Perturbed-Attention Guidance (Ahn et al. 2024) scale `s_pag` in `+ s_pag * (o_cond - o_perturbed)`:
    the perturbed pass runs the conditional rows with the self-attention of `pag_layers` replaced by
    the identity. 0 (the default) is off; diffusers' PAG pipelines default to 3.0. `scale=0,
    pag_scale=3.0` is PAG alone. Costs B more rows per step (in the main call, or the degraded one:
    `exact_pag_pass`). One number, or one per image (as `scale`)."""

    pag_layers: tuple = ("mid",)
    """Where PAG perturbs: diffusers' `pag_applied_layers` identifiers, matched against the names of the
    model's self-attention layers exactly as diffusers matches them (a regular-expression search in
    each name: "mid", "down_blocks.1", "up_blocks.0.attentions.0", "transformer_blocks.1"; note that
    "transformer_blocks.1" also finds "transformer_blocks.10", in diffusers too). A string is one
    identifier. Checked when a pipeline is enabled with pag_scale > 0."""

    pag_adaptive_scale: float = 0.0
    """diffusers' adaptive PAG: the scale at timestep t is `max(pag_scale - pag_adaptive_scale * (1000 - t), 0)`,
    so PAG fades out as t falls (and its pass is skipped once the scale reaches 0). 0: constant."""

    exact_pag_pass: str = "main"
    """Where the rows of the terms that do not need the main pass (PAG's and SEG's) go in exact mode
    when SAG runs too (two calls a step either way): "main" runs [main batch, perturbed] then
    [degraded] (3B then B rows with PAG), "degraded" runs [main batch] then [degraded, perturbed] (2B
    then 2B: a lower activation peak, and the second call is no longer a small one). bench `step`
    measures both."""

    seg_scale: float = 0.0
    """Smoothed Energy Guidance (Hong 2024) scale in `+ s_seg * (o_cond - o_smoothed)`: the conditional
    rows again, with the queries of `seg_layers` blurred over the layer's (h, w) grid by a Gaussian of
    `seg_blur_sigma`. 0 (the default) is off; diffusers' guider defaults to 2.8. B more rows per step.
    One number, or one per image (as `scale`)."""

    seg_layers: tuple = ("mid",)
    """Where SEG blurs the queries: identifiers matched as `pag_layers` (diffusers' PAG matching; the
    SEG paper blurs the mid block's self-attention on SDXL)."""

    seg_blur_sigma: float = 9999999.0
    """Standard deviation of SEG's query blur in tokens of the layer's grid. At or above 9999.0
    (diffusers' `seg_blur_threshold_inf`) the blur is infinite: every query becomes the mean query,
    so every token attends uniformly (the paper's default). Smaller values smooth less; the paper
    controls it on a log scale."""

    stg_scale: float = 0.0
    """Spatiotemporal Skip Guidance (Hyung et al. 2024) scale in `+ s_stg * (o_cond - o_skipped)`: the
    conditional rows again with the blocks `stg_layers` skipped (`stg_mode`). 0 (the default) is off,
    as in diffusers' community STG pipelines (their examples use 1.0). On the families with a
    transformer block stack (the video families). B more rows per step. One number, or one per image."""

    stg_layers: tuple = ("mid",)
    """Which blocks STG skips: block indices (as the STG pipelines' `stg_applied_layers_idx`, e.g. [8]),
    "mid" (the middle block) or block names ("blocks.8", "transformer_blocks.19"). Checked when a
    pipeline is enabled with stg_scale > 0."""

    stg_mode: str = "block"
    """"block" (the paper's STG-R, diffusers' community STG pipelines): the skipped rows get each block's
    inputs back as its outputs. "attention" (STG-A): only the blocks' self-attention is skipped, each
    token attending to itself alone (PAG's perturbation on those blocks); the rest of the block runs."""

    stg_interval: tuple = (0.0, 1.0)
    """Steps with STG (as `cfg_interval`; the community pipelines guide every step)."""

    cfg_scale: object = None
    """Classifier-free guidance scale: None takes the pipeline call's `guidance_scale` and leaves the
    pipeline's own CFG line to apply it; a number, or one value per image, makes sagfast compute each
    image's guided prediction itself (the pipeline's line then gives it unchanged). An image with
    `cfg_scale <= 1` is guided without CFG (its guide branch is its cond row) while sharing the batch
    with CFG images; the call's `guidance_scale` must then be > 1 when any image uses CFG, so that
    the pipeline batches [uncond, cond]. Refuses the pipeline's `guidance_rescale > 0`."""

    cfg_rule: str = "cfg"
    """How the uncond and cond predictions are combined: "cfg" (`o_u + g * (o_c - o_u)`), "apg"
    (adaptive projected guidance, Sadat et al. 2024: the update's component parallel to o_c scaled
    by `apg_eta`, its norm capped at `apg_rescale`, optional momentum), or "cfg_zero_star" (Fan et
    al. 2025: o_u scaled by the projection of o_c on it, and a zero prediction for the first
    `zero_init_steps` steps), as diffusers' AdaptiveProjectedGuidance and
    ClassifierFreeZeroStarGuidance. Only the combine changes: no extra rows; every term (SAG, PAG, ...)
    adds to it. Anything but "cfg" refuses the pipeline's `guidance_rescale > 0`."""

    apg_momentum: float | None = None
    """APG's momentum on the update (diffusers' `adaptive_projected_guidance_momentum`; the paper uses
    -0.5). None or 0: no momentum."""

    apg_rescale: float = 15.0
    """APG's norm threshold: the update's L2 norm (per image) is capped at this. 0: no cap."""

    apg_eta: float = 1.0
    """APG's weight of the update's component parallel to the conditional prediction (0 drops it, the
    paper's choice; 1 keeps it, diffusers' default)."""

    zero_init_steps: int = 1
    """CFG-Zero*: the first `zero_init_steps` steps of the call predict zero."""

    cfg_interval: tuple = (0.0, 1.0)
    """Guidance interval of CFG (Kynkaanniemi et al. 2024) as fractions of the call's denoising steps:
    step i of N is guided when `start <= i / N < stop`. Outside it only the conditional rows are run
    and returned for both CFG halves, so the pipeline's CFG line gives the conditional prediction at
    half the batch."""

    sag_interval: tuple = (0.0, 1.0)
    """Steps with SAG (as `cfg_interval`); outside it no degraded rows are run."""

    pag_interval: tuple = (0.0, 1.0)
    """Steps with PAG (as `cfg_interval`); outside it no perturbed rows are run."""

    seg_interval: tuple = (0.0, 1.0)
    """Steps with SEG (as `cfg_interval`; diffusers' SEG guider counts `start < i`, sagfast `start <= i`
    as for every interval)."""

    def __post_init__(self):
        problems = []
        # Numbers arrive from JSON bodies, numpy and torch: any real number (a 0-d tensor or array included)
        # is taken and stored as a Python float; NaN and infinity are refused (a NaN scale makes NaN
        # images, a NaN threshold switches SAG off silently).
        checks = [
            ("threshold", check_real, {}),
            ("blur_sigma", check_real, {"low": 0.0, "low_ok": False}),
            ("blur_sigma_t", check_real, {"low": 0.0}),
            ("random_mask_ratio", check_real, {"low": 0.0, "high": 1.0}),
            ("pag_adaptive_scale", check_real, {"low": 0.0}),
            ("seg_blur_sigma", check_real, {"low": 0.0, "low_ok": False}),
            ("apg_rescale", check_real, {"low": 0.0}),
            ("apg_eta", check_real, {}),
            *((name, check_scales, {}) for name in PER_IMAGE if name != "cfg_scale" or self.cfg_scale is not None),
            *((name, check_interval, {}) for name in INTERVALS),
            ("pag_layers", check_layers, {}),
            ("seg_layers", check_layers, {}),
            ("layers", check_layer, {}),
            ("blur_kernel_size", check_odd_int, {}),
            ("stg_mode", check_choice, {"allowed": STG_MODES}),
            ("exact_pag_pass", check_choice, {"allowed": PAG_PASSES}),
            ("mode", check_choice, {"allowed": MODES}),
            ("backend", check_choice, {"allowed": BACKENDS}),
            ("mask", check_choice, {"allowed": MASKS}),
            ("cfg_rule", check_choice, {"allowed": tuple(CFG_RULES)}),
        ]
        for name, check, options in checks:
            value, problem = check(name, getattr(self, name), **options)
            if problem is not None:
                problems.append(problem)
            else:
                object.__setattr__(self, name, value)
        if self.apg_momentum is not None:
            value, why = _real(self.apg_momentum)
            if why is not None:
                problems.append(f"apg_momentum {why} or None, got {self.apg_momentum!r}")
            else:
                object.__setattr__(self, "apg_momentum", value or None)
        z = self.zero_init_steps
        if isinstance(z, numbers.Integral) and not isinstance(z, bool) and z >= 0:
            object.__setattr__(self, "zero_init_steps", int(z))
        else:
            problems.append(f"zero_init_steps must be an int >= 0, got {z!r}")
        layers = (self.stg_layers,) if isinstance(self.stg_layers, (str, int)) else self.stg_layers
        if (
            isinstance(layers, (list, tuple))
            and layers
            and all((isinstance(x, str) and x) or (isinstance(x, numbers.Integral) and not isinstance(x, bool)) for x in layers)
        ):
            object.__setattr__(self, "stg_layers", tuple(x if isinstance(x, str) else int(x) for x in layers))
        else:
            problems.append(f'stg_layers must be a block index, "mid", a block name, or a non-empty list of them, got {self.stg_layers!r}')
        if not isinstance(self.cuda_graph, bool):
            problems.append(f"cuda_graph must be True or False, got {self.cuda_graph!r}")
        if problems:
            raise ValueError("invalid SAGConfig: " + "; ".join(problems))

    def pag_scale_at(self, timestep: float):
        """PAG's scale at `timestep` (diffusers' adaptive rule when `pag_adaptive_scale` > 0); a tuple
        when it is per image."""
        if self.pag_adaptive_scale == 0:
            return self.pag_scale

        def at(s):
            return max(s - self.pag_adaptive_scale * (1000 - timestep), 0.0)

        return tuple(at(s) for s in self.pag_scale) if isinstance(self.pag_scale, tuple) else at(self.pag_scale)

    @property
    def owns_cfg(self) -> bool:
        """Whether sagfast computes the CFG combine itself (a CFG rule other than plain CFG, or its own
        `cfg_scale`) instead of leaving it to the pipeline's CFG line."""
        return self.cfg_rule != "cfg" or self.cfg_scale is not None

    @property
    def has_intervals(self) -> bool:
        """Whether any term is limited to part of the steps (the step index must then be known)."""
        return any(getattr(self, name) != FULL for name in INTERVALS)

    @property
    def guides(self) -> bool:
        """Whether this config changes anything at all (else the model is called as it is)."""
        return any(term.requested(self) for term in TERMS) or self.owns_cfg or self.cfg_interval != FULL


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


def check_choice(name: str, value, allowed: tuple) -> tuple:
    """One of the strings `allowed`."""
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
