"""One configuration object for everything sagfast does, each field with its trade-off."""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

MODES = ("exact", "batched")
BACKENDS = ("auto", "triton", "cpp", "torch")
MASKS = ("attention", "global", "random")
PAG_PASSES = ("main", "degraded")
FULL = (0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class SAGConfig:
    """Settings of Self-Attention Guidance (Hong et al., ICCV 2023).

    Frozen: `sagfast.enable(pipe, config, **overrides)` makes a new one with `dataclasses.replace`.
    """

    scale: float = 0.75
    """SAG scale `s` in `out = cfg + s * (o_guide - o_degraded) [+ PAG's term]`. The paper uses 0.1 to 1.0; diffusers'
    default is 0.75. Larger values sharpen structure more and start to over-saturate. 0 disables SAG
    (the wrapped UNet then makes exactly the plain pipeline's call)."""

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
    `exact_pag_pass`)."""

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
    """Where the perturbed rows go in exact mode when SAG and PAG are both on (two calls a step either
    way): "main" runs [main batch, perturbed] then [degraded] (3B then B rows), "degraded" runs [main
    batch] then [degraded, perturbed] (2B then 2B: a lower activation peak, and the second call is no
    longer a small one). bench `step` measures both."""

    cfg_interval: tuple = (0.0, 1.0)
    """Guidance interval of CFG (Kynkaanniemi et al. 2024) as fractions of the call's denoising steps:
    step i of N is guided when `start <= i / N < stop`. Outside it only the conditional rows are run
    and returned for both CFG halves, so the pipeline's CFG line gives the conditional prediction at
    half the batch."""

    sag_interval: tuple = (0.0, 1.0)
    """Steps with SAG (as `cfg_interval`); outside it no degraded rows are run."""

    pag_interval: tuple = (0.0, 1.0)
    """Steps with PAG (as `cfg_interval`); outside it no perturbed rows are run."""

    def __post_init__(self):
        problems = []
        # Numbers arrive from JSON bodies, numpy and torch: any real number (a 0-d tensor included) is
        # taken and stored as a Python float; NaN and infinity are refused (a NaN scale makes NaN
        # images, a NaN threshold switches SAG off silently).
        for name, low, low_ok in (
            ("scale", 0.0, True),
            ("threshold", None, True),
            ("blur_sigma", 0.0, False),
            ("random_mask_ratio", 0.0, True),
        ):
            value, why = _real(getattr(self, name))
            if why is None and low is not None and (value < low or (value == low and not low_ok)):
                why = f"must be {'>=' if low_ok else '>'} {low:g}"
            if why is None and name == "random_mask_ratio" and value > 1.0:
                why = "must be in [0, 1]"
            if why is not None:
                problems.append(f"{name} {why}, got {getattr(self, name)!r}")
            else:
                object.__setattr__(self, name, value)
        for name in ("pag_scale", "pag_adaptive_scale"):
            value, why = _real(getattr(self, name))
            if why is None and value < 0:
                why = "must be >= 0"
            if why is not None:
                problems.append(f"{name} {why}, got {getattr(self, name)!r}")
            else:
                object.__setattr__(self, name, value)
        for name in ("cfg_interval", "sag_interval", "pag_interval"):
            interval, why = _interval(getattr(self, name))
            if why is not None:
                problems.append(f"{name} {why}, got {getattr(self, name)!r}")
            else:
                object.__setattr__(self, name, interval)
        layers = (self.pag_layers,) if isinstance(self.pag_layers, str) else self.pag_layers
        if isinstance(layers, (list, tuple)) and layers and all(isinstance(x, str) and x for x in layers):
            object.__setattr__(self, "pag_layers", tuple(layers))
        else:
            problems.append(f'pag_layers must be a non-empty string or list of strings ("mid", "up_blocks.0"), got {self.pag_layers!r}')
        if self.exact_pag_pass not in PAG_PASSES:
            problems.append(f"exact_pag_pass must be one of {PAG_PASSES}, got {self.exact_pag_pass!r}")
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {self.mode!r}")
        k = self.blur_kernel_size
        if isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1 and k % 2 == 1:
            object.__setattr__(self, "blur_kernel_size", int(k))
        else:
            problems.append(f"blur_kernel_size must be an odd int >= 1, got {k!r}")
        if not isinstance(self.layers, str) or not self.layers:
            problems.append(f'layers must be "mid" or the module name of a self-attention layer, got {self.layers!r}')
        if not isinstance(self.cuda_graph, bool):
            problems.append(f"cuda_graph must be True or False, got {self.cuda_graph!r}")
        if self.backend not in BACKENDS:
            problems.append(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.mask not in MASKS:
            problems.append(f"mask must be one of {MASKS}, got {self.mask!r}")
        if problems:
            raise ValueError("invalid SAGConfig: " + "; ".join(problems))

    def pag_scale_at(self, timestep: float) -> float:
        """PAG's scale at `timestep` (diffusers' adaptive rule when `pag_adaptive_scale` > 0)."""
        if self.pag_adaptive_scale == 0:
            return self.pag_scale
        return max(self.pag_scale - self.pag_adaptive_scale * (1000 - timestep), 0.0)

    @property
    def has_intervals(self) -> bool:
        """Whether any term is limited to part of the steps (the step index must then be known)."""
        return any(i != FULL for i in (self.cfg_interval, self.sag_interval, self.pag_interval))

    @property
    def guides(self) -> bool:
        """Whether this config changes anything at all (else the model is called as it is)."""
        return self.scale > 0 or self.pag_scale > 0 or self.cfg_interval != FULL


def _real(value) -> tuple:
    """(value as a finite Python float, None), or (None, why it is not one)."""
    if torch.is_tensor(value):
        if value.numel() != 1 or value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
            return None, "must be a real number (a 0-d real tensor is accepted)"
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None, "must be a real number"
    value = float(value)
    if not math.isfinite(value):
        return None, "must be finite"
    return value, None


def _interval(value) -> tuple:
    """((start, stop) as Python floats, None), or (None, why it is not a guidance interval)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None, "must be (start, stop), two fractions of the denoising steps"
    (start, why_start), (stop, why_stop) = _real(value[0]), _real(value[1])
    if why_start or why_stop:
        return None, f"start and stop {why_start or why_stop}"
    if not 0.0 <= start <= stop <= 1.0:
        return None, "must have 0 <= start <= stop <= 1"
    return (start, stop), None
