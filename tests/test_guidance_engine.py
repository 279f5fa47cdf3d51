"""The guidance engine: SAG and PAG together in as few model calls as the terms allow, and guidance
intervals for CFG, SAG and PAG, on tiny random components.

- SAG+PAG is the sum of its terms: the first step's prediction (what the pipeline hands its scheduler)
  of a SAG+PAG run equals SAG's plus PAG's minus the plain pipeline's, each from its own run, in every
  family, for both exact layouts; so batching the passes changes nothing but speed.
- Calls per step, counted by a hook on the model, for every combination and mode.
- Intervals: which steps run which rows (Heun: both evaluations of a step count as that step), and CFG
  outside its interval equals the plain pipeline with its guidance turned off for those steps.
- Bad input is refused with an error that names it, and the pipeline is left untouched.
"""

import pytest
import torch
from components import prompt_embeds, sd_components, sd_pipeline
from diffusers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, StableDiffusionImg2ImgPipeline
from test_families import PIPELINES as VP_PIPELINES
from test_families import call_kwargs as vp_kwargs
from test_families_flow import call_kwargs as flow_kwargs
from test_families_flow import flux, sd3

import sagfast


def sd_kwargs(cfg_on, steps=4):
    pe, ne = prompt_embeds(2)
    return dict(
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        height=48,
        width=40,
        num_inference_steps=steps,
        output_type="latent",
        guidance_scale=5.0 if cfg_on else 1.0,
        generator=torch.Generator().manual_seed(0),
    )


FAMILIES = {
    "sd": (sd_pipeline, sd_kwargs, "mid"),
    "ddpm": (VP_PIPELINES["ddpm"], lambda cfg_on: vp_kwargs("ddpm", cfg_on), "mid"),
    "dit": (VP_PIPELINES["dit"], lambda cfg_on: vp_kwargs("dit", cfg_on), "transformer_blocks.1"),
    "pixart": (VP_PIPELINES["pixart"], lambda cfg_on: vp_kwargs("pixart", cfg_on), "transformer_blocks.1"),
    # sigma < 1 at the first step: at sigma = 1 flow matching's degraded input is x and SAG's term 0.
    "sd3": (sd3, lambda cfg_on: dict(flow_kwargs("sd3", cfg_on), sigmas=[0.9, 0.6, 0.3]), "transformer_blocks.1"),
}
CASES = [("sd", True), ("sd", False), ("ddpm", False), ("dit", True), ("dit", False), ("pixart", True), ("sd3", True), ("sd3", False)]
IDS = [f"{n}-{'cfg' if c else 'nocfg'}" for n, c in CASES]


def model_of(pipe):
    return pipe.components["unet" if "unet" in pipe.components else "transformer"]


class Calls:
    """The batch size of every model call, and every prediction the pipeline hands its scheduler."""

    def __init__(self, pipe):
        self.sizes, self.predictions = [], []
        model = model_of(pipe)
        self.handle = model.register_forward_pre_hook(self.pre, with_kwargs=True)
        self.scheduler = pipe.scheduler
        original = pipe.scheduler.step

        def step(model_output, *args, **kwargs):
            self.predictions.append(model_output.detach().clone())
            return original(model_output, *args, **kwargs)

        pipe.scheduler.step = step  # observed, not changed; removed by remove()

    def pre(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.sizes.append(sample.shape[0])

    def remove(self):
        self.handle.remove()
        del self.scheduler.step


def calls_of(pipe, kwargs: dict) -> Calls:
    """The model calls and predictions of one call of `pipe`."""
    calls = Calls(pipe)
    try:
        with torch.no_grad():
            calls.output = pipe(**kwargs).images
    finally:
        calls.remove()
    return calls


def run(name, cfg_on, **config):
    """(first step's prediction, batch sizes of every model call) of the family's pipeline with
    `config` (none: the plain pipeline)."""
    make, kwargs, _ = FAMILIES[name]
    pipe = make()
    if config:
        sagfast.enable(pipe, **config)
    calls = calls_of(pipe, kwargs(cfg_on))
    return calls.predictions[0], calls.sizes


@pytest.mark.parametrize("name, cfg_on", CASES, ids=IDS)
def test_sag_plus_pag_is_the_sum_of_its_terms(name, cfg_on):
    layer = FAMILIES[name][2]
    plain, _ = run(name, cfg_on)
    sag, _ = run(name, cfg_on, scale=0.75)
    pag, _ = run(name, cfg_on, scale=0, pag_scale=3.0, pag_layers=layer)
    want = sag + pag - plain
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (sag - plain).abs().max() > 100 * bound and (pag - plain).abs().max() > 100 * bound  # both terms act
    for layout in ("main", "degraded"):
        both, _ = run(name, cfg_on, scale=0.75, pag_scale=3.0, pag_layers=layer, exact_pag_pass=layout)
        assert (both - want).abs().max().item() <= bound, layout


@pytest.mark.parametrize("name, cfg_on", CASES, ids=IDS)
def test_batched_sag_plus_pag_is_one_call_of_4b_per_step_after_the_first(name, cfg_on):
    _, sizes = run(name, cfg_on, scale=0.75, pag_scale=3.0, pag_layers=FAMILIES[name][2], mode="batched")
    full = sizes[0] - sizes[0] // (3 if cfg_on else 2)  # the first main call is [batch, perturbed]
    b = full // 2 if cfg_on else full
    assert sizes[:2] == [full + b, b]  # the first step is exact
    assert sizes[2:] == [full + 2 * b] * (len(sizes) - 2) and len(sizes) > 2


# (config, calls per step) on the SD pipeline, B = 2 rows per branch, CFG on: [uncond, cond] is 4 rows.
CALLS = [
    (dict(scale=0.75), [4, 2]),
    (dict(scale=0, pag_scale=3.0), [6]),
    (dict(scale=0.75, pag_scale=3.0), [6, 2]),
    (dict(scale=0.75, pag_scale=3.0, exact_pag_pass="degraded"), [4, 4]),
]


@pytest.mark.parametrize("config, per_step", CALLS, ids=["sag", "pag", "sag+pag-main", "sag+pag-degraded"])
def test_exact_calls_per_step(config, per_step):
    _, sizes = run("sd", True, **config)
    assert sizes == per_step * 4


def test_sag_interval_runs_degraded_rows_on_its_steps_only():
    _, sizes = run("sd", True, scale=0.75, sag_interval=(0.0, 0.5))
    assert sizes == [4, 2] * 2 + [4] * 2  # 4 steps: i / N = 0, 0.25 in, 0.5, 0.75 out
    pipe = sd_pipeline()
    sagfast.enable(pipe, scale=0.75, sag_interval=(0.0, 0.5))
    assert calls_of(pipe, sd_kwargs(True, steps=10)).sizes == [4, 2] * 5 + [4] * 5  # exactly 5 of 10 steps have a degraded pass


def test_pag_interval_and_batched_mode_after_a_gap():
    _, sizes = run("sd", True, scale=0, pag_scale=3.0, pag_interval=(0.25, 0.75))
    assert sizes == [4, 6, 6, 4]
    # SAG from step 1 on in batched mode: step 0's main pass records eps and mask (SAG is still to
    # come), so the first SAG step is already one batched call.
    _, sizes = run("sd", True, scale=0.75, mode="batched", sag_interval=(0.25, 1.0))
    assert sizes == [4, 6, 6, 6]
    # CFG off from step 2: the batch layout changes, so that step is exact again, then batched.
    _, sizes = run("sd", True, scale=0.75, mode="batched", cfg_interval=(0.0, 0.5))
    assert sizes == [4, 2, 6, 2, 2, 4]


def test_heun_counts_both_evaluations_of_a_step_as_that_step():
    pipe = sd_pipeline(scheduler_cls=HeunDiscreteScheduler)
    sagfast.enable(pipe, scale=0.75, sag_interval=(0.0, 0.5))
    calls = calls_of(pipe, sd_kwargs(True, steps=4))
    main = [s for s in calls.sizes if s == 4]
    assert len(main) == len(pipe.scheduler.timesteps) == 7  # Heun: 2N - 1 evaluations
    # Steps 0 and 1 (evaluations 0-3) have a degraded pass, steps 2 and 3 (evaluations 4-6) none.
    assert calls.sizes == [4, 2] * 4 + [4] * 3


def test_cfg_outside_its_interval_equals_the_pipeline_with_guidance_turned_off():
    kwargs = sd_kwargs(True, steps=10)
    pipe = sd_pipeline(scheduler_cls=EulerDiscreteScheduler)

    def guidance_off_after_step_5(p, i, t, tensors):
        # diffusers' recipe for turning CFG off mid-call: guidance scale 1 and the cond embeddings only.
        if i == 5:
            p._guidance_scale = 1.0
            return {"prompt_embeds": tensors["prompt_embeds"].chunk(2)[-1]}
        return {}

    want = pipe(
        **dict(kwargs, generator=torch.Generator().manual_seed(0)),
        callback_on_step_end=guidance_off_after_step_5,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    ).images
    full = pipe(**dict(kwargs, generator=torch.Generator().manual_seed(0))).images
    sagfast.enable(pipe, scale=0, cfg_interval=(0.0, 0.6))
    calls = calls_of(pipe, dict(kwargs, generator=torch.Generator().manual_seed(0)))
    got = calls.output
    assert calls.sizes == [4] * 6 + [2] * 4  # the last 4 steps run B rows
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    # CFG changes these late steps' latents by 4x the bound (measured): a run that kept CFG on fails.
    assert (full - want).abs().max().item() > 2 * bound


def processors(pipe):
    return dict(model_of(pipe).attn_processors)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(pag_scale=-1.0), r"pag_scale must be >= 0, got -1\.0"),
        (dict(pag_adaptive_scale=float("nan")), "pag_adaptive_scale must be finite"),
        (dict(sag_interval=(0.5, 1.5)), r"sag_interval must have 0 <= start <= stop <= 1, got \(0\.5, 1\.5\)"),
        (dict(cfg_interval=(-0.1, 0.5)), "cfg_interval must have 0 <= start <= stop <= 1"),
        (dict(pag_interval=(0.7, 0.2)), r"pag_interval must have 0 <= start <= stop <= 1, got \(0\.7, 0\.2\)"),
        (dict(pag_interval=0.5), r"pag_interval must be \(start, stop\)"),
        (dict(pag_layers=[]), "pag_layers must be a non-empty string or list of strings"),
        (dict(exact_pag_pass="both"), "exact_pag_pass must be one of"),
        (
            dict(pag_scale=3.0, pag_layers=["mid", "down_blocks.7"]),
            r"pag_layers entry 'down_blocks\.7' matches no self-attention layer of this UNet2DConditionModel.*"
            r"down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1.*mid_block\.attentions\.0\.transformer_blocks\.0\.attn1",
        ),
        (dict(pag_scale=3.0, pag_layers="(mid"), "pag_layers entry '\\(mid' is not a valid regular expression"),
    ],
)
def test_bad_guidance_input_is_refused_and_the_pipeline_untouched(overrides, message):
    pipe = sd_pipeline()
    before, cls = processors(pipe), type(pipe)
    with pytest.raises(ValueError, match=message):
        sagfast.enable(pipe, **overrides)
    assert type(pipe) is cls and not sagfast.is_enabled(pipe) and processors(pipe) == before


def test_pag_on_flux_is_refused_untouched():
    pipe = flux()
    before, cls = processors(pipe), type(pipe)
    with pytest.raises(ValueError, match="does not run PAG on Flux.*Use pag_scale=0"):
        sagfast.enable(pipe, pag_scale=3.0)
    assert type(pipe) is cls and processors(pipe) == before


def test_sd3_default_pag_layer_names_its_layers():
    with pytest.raises(
        ValueError, match=r"'mid' matches no self-attention layer of this SD3Transformer2DModel.*transformer_blocks\.1\.attn"
    ):
        sagfast.enable(sd3(), pag_scale=3.0)


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, EulerDiscreteScheduler], ids=["ddim", "euler"])
def test_img2img_counts_the_steps_it_runs(scheduler_cls):
    # strength 0.5 of 10 steps runs the last 5 of the schedule: i / N counts those 5 (from the call's
    # first evaluation), so sag_interval (0, 0.5) guides 3 of them (0, 0.2, 0.4).
    pipe = StableDiffusionImg2ImgPipeline(**sd_components(scheduler_cls=scheduler_cls))
    pipe.set_progress_bar_config(disable=True)
    sagfast.enable(pipe, scale=0.75, sag_interval=(0.0, 0.5))
    pe, ne = prompt_embeds(1)
    image = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(5)) * 2 - 1
    call = dict(prompt_embeds=pe, negative_prompt_embeds=ne, image=image, strength=0.5, num_inference_steps=10, output_type="latent")
    assert calls_of(pipe, call).sizes == [2, 1] * 3 + [2] * 2
