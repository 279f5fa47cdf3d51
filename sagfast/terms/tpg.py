"""Token Perturbation Guidance (Rajabi et al. 2025, arXiv 2506.10036): the cond rows again, with the
tokens entering chosen transformer blocks shuffled, and `+ tpg_scale * (o_cond - o_shuffled)`.

Shuffling the tokens keeps every token's values (the input's norm and statistics) and destroys where
they are: the block sees the same content in scrambled positions, a perturbation that, unlike PAG's or
SEG's, needs no attention layer and no training. At each block of `tpg_layers` the rows' block input
`hidden_states` (the image or video tokens; on joint-attention families the text stream
`encoder_hidden_states` is left as it is) is permuted along the token axis: at step i of the call the
permutation of n tokens is `torch.randperm(n, generator=torch.Generator().manual_seed(tpg_seed + i))`,
one per block size n, the same for every image and every chosen block of that size. Both evaluations
of a second-order (Heun-type) step are step i: they use one permutation. The rest of the block, and
every other block, runs as it is.

The rows take the cond rows' inputs and need no main pass: they join the step's main call in both
modes (sagfast.terms.base.InputRule, applied by the block pre-hook in sagfast.attention.capture).
"""

from __future__ import annotations

import numbers

import torch

from sagfast.core.settings import Setting, check_layers, interval, scale
from sagfast.terms.base import InputRule, Rows, Term

SEED_LIMIT = 2**63
"""tpg_seed must stay below this: `seed + i` is a torch generator seed for every step i of a call."""


def check_seed(name: str, value) -> tuple:
    """An int with 0 <= seed < 2**63 (a Python or numpy integer, not a bool), as a Python int."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value < SEED_LIMIT:
        return int(value), None
    return None, f"{name} must be an int with 0 <= seed < 2**63, got {value!r}"


def permutation(n: int, seed: int) -> torch.Tensor:
    """The token order of a block of n tokens at the step whose seed (`tpg_seed + i`) is `seed`."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class TPG(Term):
    name = "tpg"
    order = 40
    settings = (
        scale(
            "tpg_scale",
            (
                "Token Perturbation Guidance (Rajabi et al. 2025) scale in `+ s_tpg * (o_cond - o_shuffled)`: the "
                "conditional rows again, with the tokens entering the blocks `tpg_layers` shuffled (a new permutation "
                "every step, from `tpg_seed`). 0 (the default) is off. Every family with transformer blocks (UNets, "
                "DiT, PixArt, SD3, Flux's double-stream blocks, the video families). B more rows per step, in the "
                "main call. One number, or one per image (as `scale`)."
            ),
        ),
        Setting(
            "tpg_layers",
            ("mid",),
            check_layers,
            (
                'Which transformer blocks get shuffled tokens: "mid" (the middle transformer block: on a UNet the middle '
                "one of the mid block's, `mid_block.attentions.0.transformer_blocks.0` on SD 1.x/2.x; on a transformer "
                "the block at len // 2 of its stack) or full block names (`down_blocks.1.attentions.0.transformer_blocks.0`"
                ", `transformer_blocks.3`, Wan's `blocks.3`). A string is one block. Checked when a pipeline is enabled "
                "with tpg_scale > 0; an unknown name is refused with the model's blocks."
            ),
        ),
        interval("tpg_interval", ("Steps with TPG (as `cfg_interval`); outside it no shuffled rows are run.")),
        Setting(
            "tpg_seed",
            0,
            check_seed,
            (
                "Seed of TPG's token permutations: step i of a call shuffles n tokens by `torch.randperm(n, "
                "generator=torch.Generator().manual_seed(tpg_seed + i))`, so a call's permutations are reproducible and "
                "independent of the call's noise generator. 0 <= tpg_seed < 2**63."
            ),
        ),
    )
    scale_field = "tpg_scale"
    interval_field = "tpg_interval"
    layers_field = "tpg_layers"
    layers_kind = "block"
    source = "cond"

    @classmethod
    def layers_of(cls, family, model, config) -> list:
        return family.chosen_blocks(model, config.tpg_layers, cls.layers_field)

    def rows(self, step) -> Rows:
        # The step's index in the call, as the guidance intervals count it (`GuidedCall.position`): the
        # engine computes `step.index` only where an interval or a CFG rule asks for it.
        index, _ = self.call.position(step.call[self.call.family.timestep_argument])
        seed = self.config.tpg_seed + index
        orders: dict = {}  # block size n -> its permutation on the rows' device, made once per step

        def shuffle(x: torch.Tensor) -> torch.Tensor:
            n = x.shape[1]
            if n not in orders:
                orders[n] = permutation(n, seed).to(x.device)
            return x[:, orders[n]]

        return Rows(step.sample[step.cond], step.cond, InputRule(self.layers, shuffle))

    def graph_refusals(self, step) -> list[str]:
        # A graph would replay the permutation of the step it captured at every later step.
        return ["TPG shuffles the tokens by a new permutation every step"]
