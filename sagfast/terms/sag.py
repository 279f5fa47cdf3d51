"""Self-Attention Guidance (Hong et al., ICCV 2023): the guide branch's prediction degraded where the
model attends most, and `+ scale * (o_guide - o_degraded)`.

Its rows are built from a main pass: the capture layer's switch records the guide rows' attention
mass in the main pass (sagfast.attention.capture), the mask is `mass > threshold` on the layer's map,
and the degraded input is the guide rows' predicted x0 blurred under the mask and re-noised to the
step's noise level (sagfast.ops.degrade). In exact mode the main pass is this step's (a second model
call); in batched mode it is the previous evaluation's eps and mask applied to this step's input, so
the degraded rows join the main call (docs/design.md, "One call per step"):

    x0' = (x - b * eps_prev) / a
    xd  = a * Degrade(x0'; M_prev) + b * eps_prev  =  x - a * M_prev * (x0' - Blur(x0'))

which is the exact-mode input whenever eps_prev equals this step's eps. Where a = 0 (flow matching's
first step, sigma = 1) it is x itself: no division by zero is taken.
"""

from __future__ import annotations

import dataclasses

import torch

from sagfast import ops
from sagfast.core.schedule import Noise, x0_eps
from sagfast.core.settings import Setting, check_layer, check_odd_int, choice, interval, real, scale
from sagfast.ops.degrade import check_blur_size
from sagfast.terms.base import Rows, Term


@dataclasses.dataclass
class Previous:
    """Batched mode: eps and mask of the previous evaluation."""

    eps: torch.Tensor  # fp32 [B, C, H, W]
    mask: torch.Tensor  # bool [B, h, w]


def predicted_channels(o: torch.Tensor, sample: torch.Tensor) -> int:
    """How many output channels are the prediction SAG reads and guides: a model with learned variance
    (DiT, PixArt, DDPM's "learned_range") outputs 2C, the variance channels pass through untouched."""
    return min(o.shape[1], sample.shape[1])


def degraded_input(
    x0, mask, eps, noise: Noise, kernel_size: int, sigma: float, backend: str = "auto", sigma_t: float = 0.0
) -> torch.Tensor:
    """Exact mode's degraded input: a * Degrade(x0; mask) + b * eps, through the variance-preserving op
    (sagfast.core.schedule), for the guide rows' x0 and eps [B, C, H, W] and mask [B, h, w]; for video,
    x0 and eps [B, C, T, H, W] and mask [B, t, h, w], each frame blurred in (h, w) under its mask (a
    map frame covers T / t latent frames), and over time too where `sigma_t` > 0 (the blurred x0 is
    blurred over its frames first: a 3-D separable Gaussian; the unmasked pixels keep x0)."""
    if x0.dim() == 5:
        b, c, t = x0.shape[:3]

        def frames(v):
            return v.transpose(1, 2).reshape(b * t, c, *v.shape[-2:])

        per_frame = mask.repeat_interleave(t // mask.shape[1], dim=1).reshape(b * t, *mask.shape[-2:])
        noise = Noise(*(v.repeat_interleave(t) if v is not None else None for v in (noise.a, noise.b, noise.abar, noise.scale)))
        blurred = ops.blur_time(x0, kernel_size, sigma_t).to(x0.dtype) if sigma_t > 0 else x0
        xd = degraded_input(frames(blurred), per_frame, frames(eps), noise, kernel_size, sigma, backend)
        if sigma_t > 0:
            # The op blends with the input it blurred; the unmasked pixels are x0's, not its time blur's.
            keep = ~ops.upsample_mask_ref(per_frame, *x0.shape[-2:])
            scale = noise.abar.float().sqrt() * (noise.scale.float() if noise.scale is not None else 1.0)
            xd = xd.float() + scale.view(-1, 1, 1, 1) * keep * (frames(x0) - frames(blurred)).float()
        return xd.reshape(b, t, c, *xd.shape[-2:]).transpose(1, 2).to(x0.dtype)
    xd = ops.degrade(x0, mask, eps, noise.abar, kernel_size, sigma, backend=backend)
    return xd if noise.scale is None else xd * noise.scale.view(-1, 1, 1, 1).to(xd.dtype)


def degraded_from_previous(
    x, previous: Previous, noise: Noise, kernel_size: int, sigma: float, backend: str = "auto", sigma_t: float = 0.0
):
    """Batched mode's degraded input: this step's guide input `x` with the previous evaluation's eps and
    mask (the module docstring's formula); x itself where a = 0."""
    a = noise.a.view(-1, *([1] * (x.dim() - 1)))
    safe = Noise(torch.where(noise.a > 0, noise.a, torch.ones_like(noise.a)), noise.b, noise.abar, noise.scale)
    x0_prev, _ = x0_eps(x, previous.eps, safe, "epsilon")  # eps is eps whatever the model predicts
    xd = degraded_input(x0_prev, previous.mask, previous.eps, noise, kernel_size, sigma, backend, sigma_t)
    return torch.where(a > 0, xd, x.float())


MASKS = ("attention", "global", "random")


class SAG(Term):
    name = "sag"
    order = 0
    settings = (
        scale(
            "scale",
            (
                "SAG scale `s` in `out = cfg + s * (o_guide - o_degraded) [+ PAG's term]`. The paper uses 0.1 to 1.0; "
                "diffusers' default is 0.75. Larger values sharpen structure more and start to over-saturate. 0 "
                "disables SAG (the wrapped UNet then makes exactly the plain pipeline's call). One number for every "
                "image, or one value per image of the call (a sequence, 1-D tensor or 1-D numpy array of batch x "
                "num_images_per_prompt values): images with different settings share one model call, each guided as "
                "if alone."
            ),
            default=0.75,
            public_name="sag_scale",
        ),
        real(
            "threshold",
            1.0,
            (
                "psi: a key is masked when the attention it receives, averaged over heads, exceeds this. The mean "
                "over keys is exactly 1, so 1.0 masks the keys that get more than their share."
            ),
        ),
        Setting(
            "blur_kernel_size",
            9,
            check_odd_int,
            ("Gaussian blur window (odd). Reflect padding needs latent height and width > kernel_size // 2."),
        ),
        real("blur_sigma", 1.0, ("Gaussian blur standard deviation in latent pixels."), low=0.0, low_ok=False),
        real(
            "blur_sigma_t",
            0.0,
            (
                "Video: the blur's standard deviation over time, in latent frames. 0 (the default) blurs each frame "
                "in (h, w) only; > 0 blurs the predicted x0 over its frames as well (a window of `blur_kernel_size` "
                "frames, cut to 2T - 1 for T latent frames), in PyTorch (the fused ops are 2-D). Images ignore it."
            ),
            low=0.0,
        ),
        Setting(
            "layers",
            "mid",
            check_layer,
            (
                'Which self-attention layer the map is read from: "mid" (the first self-attention of the UNet\'s mid '
                "block, as in the paper and diffusers) or the module name of a self-attention layer, such as "
                '"down_blocks.1.attentions.0.transformer_blocks.0.attn1" (higher-resolution layers cost more).'
            ),
        ),
        choice(
            "mask",
            "attention",
            MASKS,
            (
                'Which pixels get blurred, the paper\'s ablation: "attention" (SAG), "global" (blur everything: blur '
                'guidance) or "random" (a random ~40% of pixels at the map\'s resolution).'
            ),
        ),
        real("random_mask_ratio", 0.4, ('Fraction of map pixels blurred when mask="random".'), low=0.0, high=1.0),
        interval("sag_interval", ("Steps with SAG (as `cfg_interval`); outside it no degraded rows are run.")),
    )
    scale_field = "scale"
    interval_field = "sag_interval"
    source = "guide"
    needs_main = True

    @staticmethod
    def capture_of(config) -> tuple:
        """(the layer SAG reads its map from, the mask threshold): what the capture is made with."""
        return config.layers, config.threshold

    @staticmethod
    def records_mass(config) -> bool:
        """Whether the mask comes from the attention mass (else it is global or random)."""
        return config.mask == "attention"

    def __init__(self, call):
        super().__init__(call)
        self.previous: dict = {}
        """Batched mode, eager: state key -> Previous (graphed steps keep theirs with the graphs)."""
        self.last = None
        """Batched mode: (state key, each image's guide branch) of the previous evaluation when it
        recorded eps and mask (a SAG step, or a tracked one), which are then this step's eps_prev and
        mask for the images whose guide branch is the same; else None, and the next SAG step is exact."""
        self.generators = None
        self.x0 = self.eps = self.mask = None  # of the latest main pass

    @property
    def store(self) -> dict:
        return self.call.graphs.state if self.call.graphs is not None else self.previous

    def plan(self, fraction: float) -> str | None:
        start, stop = self.config.sag_interval
        if start <= fraction < stop:
            return "on"
        # Batched mode before the interval: the main pass still records eps and mask, so that the
        # first SAG step can be batched.
        return "track" if self.config.mode == "batched" and start < stop and fraction < stop else None

    def watches_between(self) -> bool:
        return self.config.mode == "batched"

    def ready(self, step) -> tuple:
        """The images whose previous eps and mask are their guide branch's: an image whose guide branch
        changed (CFG's interval ended for it: uncond, then cond) needs this step's main pass."""
        if self.last is None or self.last[0] != step.state_key or step.state_key not in self.store:
            return ()
        return tuple(i for i, branch in enumerate(step.branches) if self.last[1][i] == branch)

    def note_step(self, step) -> None:
        """Every step of the call, whether or not SAG runs in it: which evaluation recorded last."""
        self.last = (step.state_key, step.branches) if self in step.watching else None

    def before_main(self, step) -> None:
        if self in step.on:
            image = self.call.family.to_image(step.sample, step.call)
            check_blur_size(image.shape[-2], image.shape[-1], self.config.blur_kernel_size)
        # The ablation's masks read no map.
        self.call.capture.arm(step.guide, record_mass=self.records_mass(self.config), hw=self.call.family.map_size(step.call))

    def after_main(self, step, o: torch.Tensor) -> None:
        fam = self.call.family
        image, o_image = fam.to_image(step.sample, step.call), fam.to_image(o, step.call)
        c = predicted_channels(o_image, image)
        self.x0, self.eps = x0_eps(image[step.guide, :c], o_image[step.guide, :c], step.noise, step.prediction_type)
        self.mask = self._mask(step)
        self._remember(step)

    def rows(self, step, images: tuple | None = None) -> Rows:
        fam, noise = self.call.family, step.noise
        image = fam.to_image(step.sample, step.call)
        cfg = self.config
        guide_rows, pick = step.guide, None
        if images is not None:
            # Some images only (the mixed variant): their guide rows, eps, mask and noise levels.
            pick = self.call.rows_tensor(images, step.sample.device)
            guide_rows = self.call.rows_tensor(tuple(step.guide_rows[i] for i in images), step.sample.device)
            noise = Noise(*(v[pick] if v is not None else None for v in (noise.a, noise.b, noise.abar, noise.scale)))

        def some(t):
            return t if pick is None else t[pick]

        if step.variant == "exact":
            xd = degraded_input(
                some(self.x0), some(self.mask), some(self.eps), noise, cfg.blur_kernel_size, cfg.blur_sigma, cfg.backend, cfg.blur_sigma_t
            )
        else:
            previous = self.store[step.state_key]
            previous = Previous(some(previous.eps), some(previous.mask))
            x = image[guide_rows, : previous.eps.shape[1]]
            xd = degraded_from_previous(x, previous, noise, cfg.blur_kernel_size, cfg.blur_sigma, cfg.backend, cfg.blur_sigma_t)
        guide = image[guide_rows]
        # The guide rows' extra input channels (an inpainting UNet's mask and masked image) after it.
        xd = torch.cat([xd.to(step.sample.dtype), guide[:, xd.shape[1] :]], dim=1)
        return Rows(fam.to_model_input(xd, step.call), guide_rows)

    def graph_state(self, step) -> tuple:
        previous = self.store.get(step.state_key)
        return (previous.eps, previous.mask) if previous is not None else ()

    def graph_refusals(self, step) -> list[str]:
        return ['mask="random" draws from a generator the graph does not own'] if self.config.mask == "random" else []

    def _mask(self, step) -> torch.Tensor:
        """[guide rows, h, w] bool: the rows' SAG mask after a main pass (attention, global or random)."""
        cfg, call, device = self.config, self.call, step.sample.device
        if cfg.mask == "attention":
            return call.capture.mask(call.layer_name)
        hw = call.capture.map_size(call.layer_name)
        if cfg.mask == "global":
            return torch.ones(step.b, *hw, dtype=torch.bool, device=device)
        if self.generators is None or self.generators[0].device != device:
            self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in call.seeds]
        if len(self.generators) == step.b:  # each image's mask from its own generator
            noise = torch.cat([torch.rand(1, *hw, generator=g, device=device) for g in self.generators])
        else:
            noise = torch.rand(step.b, *hw, generator=self.generators[0], device=device)
        return noise < cfg.random_mask_ratio

    def _remember(self, step) -> None:
        """Batched mode: keep this evaluation's eps and mask for the next one, in buffers that persist
        per shape (a CUDA graph reads and writes them at fixed addresses)."""
        if self.config.mode != "batched":
            return
        store, eps, mask = self.store, self.eps, self.mask
        state = store.get(step.state_key)
        if state is None or state.eps.shape != eps.shape or state.mask.shape != mask.shape:
            # Normal tensors even under torch.inference_mode: a later call outside it writes into them.
            with torch.inference_mode(False):
                store[step.state_key] = Previous(torch.empty_like(eps), torch.empty_like(mask))
            state = store[step.state_key]
        state.eps.copy_(eps)
        state.mask.copy_(mask)
