"""`sagfast.guiders.SelfAttentionGuidance` in diffusers' modular pipelines (SDXL, SD3, LTX-Video), on tiny
random components: the final latents of `sagfast.enable` on the standard pipeline with the same components,
latents and scales; its conditions through `batch_guidance`; its config through save/load.

The modular SDXL pipeline defaults to CFG 7.5 where `StableDiffusionXLPipeline` defaults to 5.0:
every call here sets 5.0 on both. Nothing else needed aligning (both use the one scheduler object's
config; neither rescales). The modular loop runs each condition as its own model call where the
standard pipeline batches [uncond, cond]: float reordering of about 1e-4 on latents of size ~60.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines import StableDiffusion3AutoBlocks
from test_families_flow import embeds, sd3
from test_modular import inputs, modular_sdxl, run
from test_pipelines import sdxl_pipeline

import sagfast
from sagfast.guiders import SelfAttentionGuidance
from sagfast.modular import batch_guidance, unbatch_guidance


def sdxl_reference(**config):
    call = inputs()
    call.pop("output")
    pipe = sagfast.enable(sdxl_pipeline(), **config)
    return pipe(**call, guidance_scale=5.0, output_type="latent").images


def modular_sd3(guider):
    std = sd3()
    blocks = StableDiffusion3AutoBlocks()
    blocks.sub_blocks.pop("text_encoder")  # takes prompt embeddings
    blocks.sub_blocks.pop("decode")  # the latents are the result
    pipe = blocks.init_pipeline()
    pipe.update_components(transformer=std.transformer, vae=std.vae, scheduler=std.scheduler, guider=guider)
    return pipe


def sd3_inputs():
    pe, pooled = embeds(1, seed=1)
    ne, npooled = embeds(1, seed=2)
    return dict(
        prompt_embeds=pe,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=ne,
        negative_pooled_prompt_embeds=npooled,
        latents=torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(4)),  # map 6 x 5
        num_inference_steps=3,
        height=24,
        width=20,
    )


def sd3_run(pipe):
    sizes = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: sizes.append(k["hidden_states"].shape[0]), with_kwargs=True)
    try:
        return pipe(**sd3_inputs(), output="latents"), sizes
    finally:
        handle.remove()


def sd3_reference(**config):
    return sagfast.enable(sd3(), **config)(**sd3_inputs(), guidance_scale=5.0, output_type="latent").images


def modular_ltx(guider):
    from diffusers.modular_pipelines.ltx import LTXBlocks
    from test_video import ltx

    std = ltx()
    blocks = LTXBlocks()
    blocks.sub_blocks.pop("text_encoder")  # takes prompt embeddings; output="latents" skips the decode
    pipe = blocks.init_pipeline()
    pipe.update_components(transformer=std.transformer, vae=std.vae, scheduler=std.scheduler, guider=guider)
    return pipe


def ltx_inputs():
    from test_video import call

    inputs = call("ltx")
    for key in ("output_type", "guidance_scale"):
        inputs.pop(key)
    return inputs


def ltx_run(pipe):
    sizes = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: sizes.append(k["hidden_states"].shape[0]), with_kwargs=True)
    try:
        return pipe(**ltx_inputs(), output="latents"), sizes  # unpacked [B, C, F, H, W]
    finally:
        handle.remove()


def ltx_reference(**config):
    from diffusers import LTXPipeline
    from test_video import call, ltx

    packed = sagfast.enable(ltx(), **config)(**call("ltx", guidance=5.0)).frames
    return LTXPipeline._unpack_latents(packed, 3, 8, 16, 1, 1)


PARITY = {
    "sdxl": (modular_sdxl, run, sdxl_reference, 4),
    "sd3": (modular_sd3, sd3_run, sd3_reference, 3),
    "ltx": (modular_ltx, ltx_run, ltx_reference, 3),
}


@pytest.mark.parametrize("mode", ["exact", "batched"])
@pytest.mark.parametrize("family", list(PARITY))
def test_the_guider_gives_sagfast_enable_on_the_standard_pipeline(family, mode):
    make, go, reference, steps = PARITY[family]
    pipe = make(ClassifierFreeGuidance(guidance_scale=5.0))
    cfg, _ = go(pipe)
    pipe.update_components(guider=SelfAttentionGuidance(guidance_scale=5.0, sag_scale=0.75, mode=mode).bind(pipe))
    got, sizes = go(pipe)
    want = reference(scale=0.75, mode=mode)
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    assert (got - cfg).abs().max().item() > 100 * bound  # SAG moved the latents
    assert len(sizes) == 3 * steps  # cond, uncond, degraded: one pass each, as diffusers' loop runs them


PAG = dict(pag_scale=3.0, pag_layers="mid")
PAG_GUIDER = dict(perturbed_guidance_scale=3.0, perturbed_guidance_layers="mid")


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
@pytest.mark.parametrize("sag, mode", [(0.0, "exact"), (0.75, "exact"), (0.75, "batched")])
def test_sag_and_pag_in_one_guider_give_sagfast_enable(family, sag, mode):
    make, go, reference = (modular_sdxl, run, sdxl_reference) if family == "sdxl" else (modular_sd3, sd3_run, sd3_reference)
    layers = "mid" if family == "sdxl" else "transformer_blocks.1"
    pipe = make(ClassifierFreeGuidance(guidance_scale=5.0))
    guider = SelfAttentionGuidance(
        guidance_scale=5.0, sag_scale=sag, mode=mode, perturbed_guidance_scale=3.0, perturbed_guidance_layers=layers
    )
    pipe.update_components(guider=guider.bind(pipe))
    got, sizes = go(pipe)
    want = reference(scale=sag, mode=mode, pag_scale=3.0, pag_layers=layers)
    plain = reference(scale=sag, mode=mode)
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    assert (want - plain).abs().max().item() > 100 * bound  # PAG moved the latents
    steps = 4 if family == "sdxl" else 3
    assert len(sizes) == (3 + (sag > 0)) * steps


@pytest.mark.parametrize(
    "config, per_step",
    [
        (dict(mode="exact"), [2, 1] * 4),  # [cond, uncond], then the degraded pass built from them
        (dict(mode="batched"), [2, 1, 3, 3, 3]),  # the degraded rows join the main call after step 0
        (dict(mode="exact", **PAG_GUIDER), [3, 1] * 4),
        (dict(mode="batched", **PAG_GUIDER), [3, 1, 4, 4, 4]),
    ],
)
def test_batch_guidance_joins_the_guiders_conditions(config, per_step):
    pipe = modular_sdxl(ClassifierFreeGuidance(guidance_scale=5.0))
    pipe.update_components(guider=SelfAttentionGuidance(guidance_scale=5.0, sag_scale=0.75, **config).bind(pipe))
    want, unbatched = run(pipe)
    batch_guidance(pipe)
    # A fresh guider: nothing it records may be left over from the unbatched run.
    pipe.update_components(guider=SelfAttentionGuidance(guidance_scale=5.0, sag_scale=0.75, **config).bind(pipe))
    got, sizes = run(pipe)
    assert sizes == per_step and sum(sizes) == sum(unbatched)
    bound = 1e-5 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    unbatch_guidance(pipe)
    again, sizes = run(pipe)
    assert sizes == unbatched and torch.equal(again, want)


@pytest.mark.parametrize("mode, per_step", [("exact", [2, 1] * 3), ("batched", [2, 1, 3, 3])])
def test_batch_guidance_joins_the_guiders_conditions_on_packed_video_tokens(mode, per_step):
    pipe = modular_ltx(SelfAttentionGuidance(guidance_scale=5.0, mode=mode))
    pipe.guider.bind(pipe)
    want, _ = ltx_run(pipe)
    batch_guidance(pipe)
    pipe.update_components(guider=SelfAttentionGuidance(guidance_scale=5.0, mode=mode).bind(pipe))
    got, sizes = ltx_run(pipe)
    assert sizes == per_step
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_sag_scale_zero_is_the_cfg_guider():
    pipe = modular_sdxl(ClassifierFreeGuidance(guidance_scale=5.0))
    cfg, _ = run(pipe)
    pipe.update_components(guider=SelfAttentionGuidance(guidance_scale=5.0, sag_scale=0.0).bind(pipe))
    got, sizes = run(pipe)
    assert len(sizes) == 8 and torch.equal(got, cfg)


def test_start_and_stop_count_steps_as_sagfasts_interval():
    pipe = modular_sdxl(ClassifierFreeGuidance(guidance_scale=5.0))
    pipe.update_components(guider=SelfAttentionGuidance(guidance_scale=5.0, start=0.5, stop=1.0).bind(pipe))
    got, sizes = run(pipe)
    assert len(sizes) == 2 + 2 + 3 + 3  # SAG on steps 2 and 3 of 4
    want = sdxl_reference(scale=0.75, sag_interval=(0.5, 1.0))
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def test_without_cfg_sag_guides_the_conditional_branch():
    pipe = modular_sdxl(ClassifierFreeGuidance(guidance_scale=1.0))
    pipe.update_components(guider=SelfAttentionGuidance(guidance_scale=1.0, sag_scale=0.75).bind(pipe))
    got, sizes = run(pipe)
    assert len(sizes) == 2 * 4
    call = inputs()
    call.pop("output")
    want = sagfast.enable(sdxl_pipeline(), scale=0.75)(**call, guidance_scale=1.0, output_type="latent").images
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def test_the_config_round_trips_through_save_and_load(tmp_path):
    guider = SelfAttentionGuidance(
        guidance_scale=4.0, sag_scale=0.5, sag_layers="mid", threshold=1.2, blur_sigma=2.0, mode="batched", stop=0.8
    )
    guider.save_pretrained(tmp_path)
    assert (tmp_path / "guider_config.json").is_file()
    loaded = SelfAttentionGuidance.from_pretrained(tmp_path)
    fields = {k: v for k, v in guider.config.items() if not k.startswith("_")}
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == fields
    assert (loaded.guidance_scale, loaded.sag_scale, loaded.threshold, loaded.blur_sigma, loaded.mode) == (4.0, 0.5, 1.2, 2.0, "batched")
    assert loaded._stop == 0.8

    pipe = modular_sdxl(ClassifierFreeGuidance(guidance_scale=5.0))
    pipe.update_components(guider=guider.bind(pipe))
    want, _ = run(pipe)
    pipe.update_components(guider=loaded.bind(pipe))
    got, _ = run(pipe)
    assert torch.equal(got, want)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_an_unbound_guider_reads_the_scheduler_of_the_pipeline_running_it(mode, batched):
    pipe = modular_sdxl(ClassifierFreeGuidance(guidance_scale=5.0))
    if batched:
        batch_guidance(pipe)
    pipe.update_components(guider=SelfAttentionGuidance(guidance_scale=5.0, mode=mode).bind(pipe))
    want, _ = run(pipe)
    pipe.update_components(guider=SelfAttentionGuidance(guidance_scale=5.0, mode=mode))
    got, sizes = run(pipe)
    assert torch.equal(got, want)
    assert len(sizes) == {(False, "exact"): 12, (False, "batched"): 12, (True, "exact"): 8, (True, "batched"): 5}[batched, mode]


def test_a_guider_bound_elsewhere_reads_the_scheduler_of_the_pipeline_running_it():
    # The pipeline stepping the latents is the one whose noise level the degraded input needs.
    pipe = modular_sdxl(SelfAttentionGuidance(guidance_scale=5.0))
    want, _ = run(pipe)
    other = modular_sdxl(ClassifierFreeGuidance(guidance_scale=5.0))
    other.update_components(scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config, beta_end=0.03))
    pipe.update_components(guider=SelfAttentionGuidance(guidance_scale=5.0).bind(other))
    got, _ = run(pipe)
    assert torch.equal(got, want)


def test_an_unbound_guider_outside_a_modular_pipeline_says_how_to_bind_it_and_leaves_the_model_as_it_was():
    # Driven as a modular loop drives it, but by hand: no pipeline runs it, so it has no scheduler.
    unet = sdxl_pipeline().unet
    before = model_hooks(unet)
    guider = SelfAttentionGuidance(guidance_scale=5.0)
    guider.set_state(0, 4, torch.tensor(999))
    embeds = inputs()
    guider.prepare_inputs({"encoder_hidden_states": (embeds["prompt_embeds"], embeds["negative_prompt_embeds"])})
    with pytest.raises(RuntimeError, match=r"guider\.bind\(pipe\)"):
        guider.prepare_models(unet)
    assert model_hooks(unet) == before


def model_hooks(model) -> dict:
    """Every hook on the model's modules: torch's forward pre-hooks and forward hooks, and the names in
    diffusers' hook registry."""
    out = {}
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        out[name] = (tuple(module._forward_pre_hooks), tuple(module._forward_hooks), tuple(registry.hooks) if registry else ())
    return out


def raise_on_pass(module, n, error):
    """A forward pre-hook on `module` (inside the model) that raises `error` on its n-th call: a failure of
    the model's pass, not of the guider (an out-of-memory error, an interrupt)."""
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) == n:
            raise error

    return module.register_forward_pre_hook(hook)


@pytest.mark.parametrize(
    "guider, batched, failure, error",
    [
        (dict(perturbed_guidance_scale=3.0, perturbed_guidance_layers="down_blocks.7"), False, None, "perturbed_guidance_layers entry"),
        (dict(blur_kernel_size=41), False, None, "too small for a blur of kernel size 41"),
        (dict(blur_kernel_size=41, mode="batched"), True, None, "too small for a blur of kernel size 41"),
        (dict(), False, (2, RuntimeError("injected")), "injected"),  # the guide pass, capture armed
        (dict(mode="batched"), True, (1, RuntimeError("injected")), "injected"),  # the joined [cond, uncond] call
        (dict(), False, (3, KeyboardInterrupt()), None),  # the degraded pass
        (dict(**PAG_GUIDER), False, (3, KeyboardInterrupt()), None),  # the perturbed pass
    ],
)
def test_a_failed_call_leaves_the_pipeline_as_it_was(guider, batched, failure, error):
    pipe = modular_sdxl(ClassifierFreeGuidance(guidance_scale=5.0))
    fresh = modular_sdxl(ClassifierFreeGuidance(guidance_scale=5.0))
    if batched:
        batch_guidance(pipe)
        batch_guidance(fresh)
    before = model_hooks(pipe.unet)
    pipe.update_components(guider=SelfAttentionGuidance(guidance_scale=5.0, **guider).bind(pipe))
    handle = raise_on_pass(pipe.unet.up_blocks[0], *failure) if failure else None
    with pytest.raises(KeyboardInterrupt if error is None else (ValueError, RuntimeError), match=error):
        run(pipe)
    if handle is not None:
        handle.remove()
    if error is not None:  # an exception: everything came off before it left the call
        assert model_hooks(pipe.unet) == before
    # An interrupt between the guider's hooks leaves them inert, and the model's next pass takes them off.
    pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=5.0))
    got, _ = run(pipe)
    want, _ = run(fresh)
    assert torch.equal(got, want)
    assert model_hooks(pipe.unet) == before


@pytest.mark.parametrize(
    "field, value",
    [
        ("mode", "fast"),
        ("sag_scale", -1.0),
        ("sag_scale", float("nan")),
        ("blur_kernel_size", 4),
        ("blur_sigma", 0.0),
        ("threshold", "1"),
        ("perturbed_guidance_scale", -2.0),
        ("perturbed_guidance_layers", [0]),
        ("perturbed_guidance_stop", 2.0),
    ],
)
def test_bad_config_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SelfAttentionGuidance(**{field: value})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sag_scale", float("inf"), "sag_scale must be finite, got inf"),
        ("guidance_scale", float("inf"), "guidance_scale must be finite, got inf"),
        ("perturbed_guidance_scale", float("inf"), "perturbed_guidance_scale must be finite, got inf"),
        ("threshold", float("-inf"), "threshold must be finite, got -inf"),
        ("blur_sigma", float("inf"), "blur_sigma must be finite, got inf"),
        ("sag_scale", True, "sag_scale must be a real number, got True"),
        ("guidance_scale", torch.tensor([5.0]), r"guidance_scale must be a real number \(a 0-d real tensor is accepted\)"),
        ("backend", "bogus", r"backend must be one of \('auto', 'triton', 'cpp', 'torch'\), got 'bogus'"),
        ("sag_layers", "", 'sag_layers must be "mid" or the module name of a self-attention layer'),
        ("start", float("nan"), r"\(start, stop\) entries must be finite, got \(nan, 1.0\)"),
    ],
)
def test_the_guider_checks_its_fields_as_sagconfig_does(field, value, message):
    with pytest.raises(ValueError, match=message):
        SelfAttentionGuidance(**{field: value})


@pytest.mark.parametrize("value", [np.float32(0.5), np.int64(2), torch.tensor(0.5), torch.tensor(2, dtype=torch.int32)])
def test_numpy_and_0d_torch_numbers_are_numbers_stored_as_floats(value, tmp_path):
    fields = ("guidance_scale", "sag_scale", "threshold", "blur_sigma", "perturbed_guidance_scale")
    guider = SelfAttentionGuidance(**dict.fromkeys(fields, value))
    for name in fields:
        assert type(getattr(guider, name)) is float and getattr(guider, name) == float(value)
        assert type(guider.config[name]) is float
    guider.save_pretrained(tmp_path)  # the config is JSON: Python numbers only
    assert SelfAttentionGuidance.from_pretrained(tmp_path).sag_scale == float(value)


def test_threshold_has_sagconfigs_rule_any_finite_number():
    # As SAGConfig's threshold: no lower bound (a negative threshold masks every key).
    assert SelfAttentionGuidance(threshold=-0.5).threshold == sagfast.SAGConfig(threshold=-0.5).threshold == -0.5


def test_bind_refuses_what_has_no_scheduler():
    with pytest.raises(ValueError, match="scheduler"):
        SelfAttentionGuidance().bind(object())


if __name__ == "__main__":  # the parity tables of docs/modular.md: python tests/test_guiders.py
    print("| pipeline | guider | max abs diff to sagfast.enable | bound | SAG/PAG effect |")
    print("|---|---|---|---|---|")
    for family in PARITY:
        make, go, reference, _ = PARITY[family]
        layers = "mid" if family == "sdxl" else "transformer_blocks.1"
        cfg = reference(scale=0.0)
        for label, guider_config, config in (
            ("SAG exact", dict(), dict(scale=0.75)),
            ("SAG batched", dict(mode="batched"), dict(scale=0.75, mode="batched")),
            (
                "PAG",
                dict(sag_scale=0.0, perturbed_guidance_scale=3.0, perturbed_guidance_layers=layers),
                dict(scale=0.0, pag_scale=3.0, pag_layers=layers),
            ),
            (
                "SAG + PAG exact",
                dict(perturbed_guidance_scale=3.0, perturbed_guidance_layers=layers),
                dict(scale=0.75, pag_scale=3.0, pag_layers=layers),
            ),
        ):
            if family == "ltx" and "PAG" in label:
                continue  # SAG only on the video families
            pipe = make(ClassifierFreeGuidance(guidance_scale=5.0))
            pipe.update_components(guider=SelfAttentionGuidance(guidance_scale=5.0, **guider_config).bind(pipe))
            got, _ = go(pipe)
            want = reference(**config)
            bound = 1e-4 * max(1.0, want.abs().max().item())
            print(f"| {family} | {label} | {(got - want).abs().max().item():.1e} | {bound:.1e} | {(want - cfg).abs().max().item():.2f} |")
    print()
    print("| guider | calls per step, loop | calls per step, batch_guidance | max abs diff | bound |")
    print("|---|---|---|---|---|")
    from test_modular import GUIDERS

    cases = {name: make for name, make in GUIDERS.items()}
    cases["sag exact"] = lambda: SelfAttentionGuidance(guidance_scale=5.0)
    cases["sag batched"] = lambda: SelfAttentionGuidance(guidance_scale=5.0, mode="batched")
    cases["sag + pag batched"] = lambda: SelfAttentionGuidance(guidance_scale=5.0, mode="batched", **PAG_GUIDER)
    for name, make in cases.items():
        pipe = modular_sdxl(ClassifierFreeGuidance(guidance_scale=5.0))
        pipe.update_components(guider=make())
        if isinstance(pipe.guider, SelfAttentionGuidance):
            pipe.guider.bind(pipe)
        want, loop = run(pipe)
        batch_guidance(pipe)
        pipe.update_components(guider=make())
        if isinstance(pipe.guider, SelfAttentionGuidance):
            pipe.guider.bind(pipe)
        got, joined = run(pipe)
        bound = 1e-5 * max(1.0, want.abs().max().item())
        print(f"| {name} | {loop} | {joined} | {(got - want).abs().max().item():.1e} | {bound:.1e} |")
