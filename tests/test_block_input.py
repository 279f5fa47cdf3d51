"""The block input rule (sagfast.terms.base.InputRule) and its hook (sagfast.attention.capture.BlockInputHook),
and the transformer blocks a family offers such a rule (`Family.transformer_blocks`, `middle_block`,
`chosen_blocks`), on real diffusers models: a tiny SD UNet (the block gets `hidden_states` positionally)
and a tiny SD3 transformer (by keyword, next to the text stream `encoder_hidden_states`).

The reference is the model run by the test itself: the rows without the rule on the plain model, the
rule's rows on the model with a forward pre-hook written here that transforms the block's input.
"""

from __future__ import annotations

import pytest
import torch
from components import CROSS_DIM, TOKENS, tiny_unet
from test_families_flow import JOINT, POOLED, TXT, sd3

from sagfast.attention.capture import ACTIVE, Capture, install, uninstall
from sagfast.families.dit import DiTFamily
from sagfast.families.sd3 import SD3Family
from sagfast.families.unet import UNetFamily
from sagfast.families.unet2d import UnconditionalUNetFamily
from sagfast.terms.base import InputRule

UNET_BLOCK = "down_blocks.1.attentions.0.transformer_blocks.0"


def flip(x):
    """A transform the test can tell apart from the identity: the tokens in reverse order."""
    return x.flip(1)


def hooks(model) -> dict:
    return {name: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in model.named_modules()}


def unet_case(n=3):
    model = tiny_unet()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, 16, 16, generator=g)
    call = dict(timestep=torch.tensor(500), encoder_hidden_states=torch.randn(n, TOKENS, CROSS_DIM, generator=g))
    return model, dict(model.named_modules())[UNET_BLOCK], x, call


def sd3_case(n=3):
    model = sd3().transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, 12, 10, generator=g)
    call = dict(
        timestep=torch.full((n,), 500.0),
        encoder_hidden_states=torch.randn(n, TXT, JOINT, generator=g),
        pooled_projections=torch.randn(n, POOLED, generator=g),
    )
    return model, model.transformer_blocks[1], x, call


def run(model, x, call):
    with torch.no_grad():
        return model(x, **call, return_dict=False)[0]


def cut(call: dict, rows: slice, n: int) -> dict:
    return {k: v[rows] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v for k, v in call.items()}


def by_hand(model, block, x, call, transform):
    """The model with `transform` on its block's `hidden_states`, by a pre-hook written here."""

    def pre(module, args, kwargs):
        if "hidden_states" in kwargs:
            return args, dict(kwargs, hidden_states=transform(kwargs["hidden_states"]))
        return (transform(args[0]), *args[1:]), kwargs

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        return run(model, x, call)
    finally:
        handle.remove()


@pytest.mark.parametrize("case", [unet_case, sd3_case], ids=["unet-positional", "sd3-keyword"])
def test_only_the_rules_rows_enter_the_block_transformed(case):
    model, block, x, call = case()
    before = hooks(model)
    plain = run(model, x, call)
    install(block.attn1 if hasattr(block, "attn1") else block.attn, model, [block])
    capture = Capture(None, model, 1, "auto", 1.0, None)
    capture.rules = ((slice(1, 2), InputRule([block], flip)),)
    kept = x.clone()
    token = ACTIVE.set(capture)
    try:
        out = run(model, x, call)
    finally:
        ACTIVE.reset(token)
    # Rows 0 and 2 are the model's own; row 1 is the model with the block's input flipped.
    torch.testing.assert_close(out[0::2], plain[0::2], rtol=0, atol=1e-5)
    want = by_hand(model, block, x[1:2], cut(call, slice(1, 2), 3), flip)
    torch.testing.assert_close(out[1:2], want, rtol=0, atol=1e-5)
    assert (want - plain[1:2]).abs().max() > 1e-2  # the flip changes the output: the check above is not vacuous
    assert torch.equal(x, kept)
    # Outside a guided pass the installed hook changes nothing, and uninstall leaves the hooks as before.
    torch.testing.assert_close(run(model, x, call), plain, rtol=0, atol=0)
    uninstall(model)
    assert hooks(model).keys() == before.keys()
    assert all(len(hooks(model)[n][i]) == len(before[n][i]) for n in before for i in (0, 1))


def test_two_rules_on_one_block_each_change_their_own_rows():
    model, block, x, call = unet_case(4)
    plain = run(model, x, call)
    install(block.attn1, model, [block])
    capture = Capture(None, model, 1, "auto", 1.0, None)
    capture.rules = ((slice(1, 2), InputRule([block], flip)), (slice(3, 4), InputRule([block], lambda t: 2 * t)))
    token = ACTIVE.set(capture)
    try:
        out = run(model, x, call)
    finally:
        ACTIVE.reset(token)
        uninstall(model)
    torch.testing.assert_close(out[0::2], plain[0::2], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1:2], by_hand(model, block, x[1:2], cut(call, slice(1, 2), 4), flip), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[3:4], by_hand(model, block, x[3:4], cut(call, slice(3, 4), 4), lambda t: 2 * t), rtol=0, atol=1e-5)


def test_a_unets_transformer_blocks_in_forward_order_and_its_middle_one():
    family = UNetFamily()
    names = list(family.transformer_blocks(tiny_unet()))
    assert names == [
        "down_blocks.1.attentions.0.transformer_blocks.0",
        "mid_block.attentions.0.transformer_blocks.0",
        "up_blocks.0.attentions.0.transformer_blocks.0",
        "up_blocks.0.attentions.1.transformer_blocks.0",
    ]
    assert family.middle_block(tiny_unet()) == "mid_block.attentions.0.transformer_blocks.0"
    # SDXL-like: a stack of blocks in each Transformer2DModel; "mid" is the middle one of the mid block's.
    deep = tiny_unet(transformer_layers_per_block=3)
    assert family.middle_block(deep) == "mid_block.attentions.0.transformer_blocks.1"
    assert list(family.transformer_blocks(deep))[3] == "mid_block.attentions.0.transformer_blocks.0"


def test_transformer_families_offer_their_stack():
    model = sd3().transformer
    family = SD3Family()
    assert list(family.transformer_blocks(model)) == ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]
    assert family.chosen_blocks(model, ("mid", "transformer_blocks.0", "transformer_blocks.1"), "x_layers") == [
        model.transformer_blocks[1],
        model.transformer_blocks[0],
    ]
    assert DiTFamily().transformer_blocks(torch.nn.Linear(1, 1)) == {}


def test_a_block_that_is_not_there_is_refused_with_the_blocks_there_are():
    family = UNetFamily()
    with pytest.raises(ValueError) as e:
        family.chosen_blocks(tiny_unet(transformer_layers_per_block=3), ("mid_block.attentions.0",), "x_layers")
    assert str(e.value) == (
        "x_layers entry 'mid_block.attentions.0' is not a transformer block of this UNet2DConditionModel: give 'mid' or a "
        "block's full name. Its transformer blocks: 'down_blocks.1.attentions.0.transformer_blocks.0' ... "
        "'down_blocks.1.attentions.0.transformer_blocks.2', 'mid_block.attentions.0.transformer_blocks.0' ... "
        "'mid_block.attentions.0.transformer_blocks.2', 'up_blocks.0.attentions.0.transformer_blocks.0' ... "
        "'up_blocks.0.attentions.0.transformer_blocks.2', 'up_blocks.0.attentions.1.transformer_blocks.0' ... "
        "'up_blocks.0.attentions.1.transformer_blocks.2'"
    )
    with pytest.raises(
        ValueError, match=r"x_layers entry 3 is not a transformer block .* 'transformer_blocks\.0' \.\.\. 'transformer_blocks\.2'$"
    ):
        SD3Family().chosen_blocks(sd3().transformer, (3,), "x_layers")
    from diffusers import UNet2DModel

    with pytest.raises(ValueError, match=r"x_layers names transformer blocks, and sagfast knows none in unconditional UNet's UNet2DModel"):
        UnconditionalUNetFamily().chosen_blocks(
            UNet2DModel(
                block_out_channels=(8, 8),
                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=4,
            ),
            ("mid",),
            "x_layers",
        )
