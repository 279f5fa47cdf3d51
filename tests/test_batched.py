"""mode="batched": one model call per step; the formulation checked against exact mode."""

import pytest
import torch
from components import prompt_embeds, scheduler_config, sd_pipeline
from diffusers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler
from recording import recording
from torch.utils import _pytree as pytree

import sagfast
from sagfast.api import config_of, guided_call

CALL = dict(height=48, width=40, num_inference_steps=3, output_type="latent")


def run_recorded(pipe, n=1, guidance_scale=7.5, **extra):
    pe, ne = prompt_embeds(n)
    with recording(pipe) as rec:
        out = pipe(
            prompt_embeds=pe,
            negative_prompt_embeds=ne,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(0),
            **CALL,
            **extra,
        ).images
    return out, [c["sample"].shape[0] for c in rec.calls]


@pytest.mark.parametrize(
    "guidance_scale, per_step_exact, per_step_batched",
    [
        (7.5, [4, 2], [6]),  # B = 2: exact 2B then B; batched one call of 3B
        (1.0, [2, 2], [4]),  # no CFG: exact B + B; batched one call of 2B
    ],
    ids=["cfg", "nocfg"],
)
def test_model_calls_and_batch_sizes_per_step(guidance_scale, per_step_exact, per_step_batched):
    pipe = sagfast.enable(sd_pipeline(), mode="exact")
    _, calls = run_recorded(pipe, n=2, guidance_scale=guidance_scale)
    assert calls == per_step_exact * 3
    sagfast.enable(pipe, mode="batched")
    _, calls = run_recorded(pipe, n=2, guidance_scale=guidance_scale)
    # The first step of a call has no previous eps: it is an exact step.
    assert calls == per_step_exact + per_step_batched * 2
    # A re-run starts afresh (state never leaks from one pipeline call into the next) ...
    _, calls = run_recorded(pipe, n=2, guidance_scale=guidance_scale)
    assert calls == per_step_exact + per_step_batched * 2
    # ... and so does a call with another batch size.
    _, calls = run_recorded(pipe, n=1, guidance_scale=guidance_scale)
    assert calls == [c // 2 for c in per_step_exact] + [c // 2 for c in per_step_batched] * 2


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, EulerDiscreteScheduler], ids=lambda c: c.__name__)
@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["cfg", "nocfg"])
def test_batched_input_equals_exact_input_when_eps_prev_is_the_current_eps(scheduler_cls, guidance_scale):
    """Two evaluations at the same x and t within one call: the second (batched) has eps_prev equal to
    its own eps and mask_prev equal to its own mask, so its degraded rows must be the exact-mode input."""
    pipe = sd_pipeline()
    pipe.scheduler = scheduler_cls.from_config(scheduler_config())
    pipe.scheduler.set_timesteps(5)
    pipe._guidance_scale = guidance_scale  # what the pipeline sets at the start of a call
    sagfast.enable(pipe, mode="batched")
    pe, ne = prompt_embeds(2)
    chunks = 2 if guidance_scale > 1 else 1
    cond = torch.cat([ne, pe]) if chunks == 2 else pe
    x = torch.randn(2 * chunks, 4, 24, 20, generator=torch.Generator().manual_seed(4))
    t = pipe.scheduler.timesteps[1]
    # A guided call run by hand (no pipeline loop): inside it, pipe.unet is the call's guided denoiser.
    with recording(pipe) as rec, guided_call(pipe, config_of(pipe)), torch.no_grad():
        exact_out = pipe.unet(x, t, encoder_hidden_states=cond).sample
        batched_out = pipe.unet(x, t, encoder_hidden_states=cond).sample
    shapes = [c["sample"].shape[0] for c in rec.calls]
    assert shapes == [2 * chunks, 2, 2 * chunks + 2]
    exact_degraded = rec.calls[1]["sample"]
    batched_degraded = rec.calls[2]["sample"][2 * chunks :]
    assert (batched_degraded - exact_degraded).abs().max().item() <= 1e-5
    # The degraded rows get the guide branch's conditioning.
    assert torch.equal(rec.calls[2]["kwargs"]["encoder_hidden_states"][2 * chunks :], cond[:2])
    # Same inputs, same model: the guided outputs agree too (up to batch-size effects of the kernels).
    assert (batched_out - exact_out).abs().max().item() <= 1e-4 * max(1.0, exact_out.abs().max().item())


def test_heun_second_evaluation_uses_the_previous_evaluation():
    pipe = sd_pipeline()
    pipe.scheduler = HeunDiscreteScheduler.from_config(scheduler_config())
    sagfast.enable(pipe, mode="batched")
    out, calls = run_recorded(pipe)
    # 3 steps = 5 evaluations: the first exact, then one 3B call each (the noise level Heun re-visits
    # is no reason to start afresh: eps_prev is simply the previous evaluation's).
    assert calls == [2, 1] + [3] * 4
    assert torch.isfinite(out).all()


def test_batched_mode_guides_and_differs_from_exact():
    plain, _ = run_recorded(sagfast.enable(sd_pipeline(), scale=0.0))
    exact, _ = run_recorded(sagfast.enable(sd_pipeline(), mode="exact"))
    batched, _ = run_recorded(sagfast.enable(sd_pipeline(), mode="batched"))
    assert torch.isfinite(batched).all()
    assert (batched - plain).abs().max() > 1e-3, "batched SAG must change the result"
    assert not torch.equal(batched, exact)


def test_cuda_graph_on_cpu_tensors_warns_and_runs_eagerly():
    eager, _ = run_recorded(sagfast.enable(sd_pipeline(), mode="batched"))
    pipe = sagfast.enable(sd_pipeline(), mode="batched", cuda_graph=True)
    with pytest.warns(RuntimeWarning, match="without a CUDA graph: CUDA graphs need CUDA tensors, got cpu"):
        out, calls = run_recorded(pipe)
    assert torch.equal(out, eager)
    assert calls == [2, 1, 3, 3]


def test_every_batched_conditioning_input_is_sliced_and_extended():
    # The shapes a UNet call can carry: SDXL's added_cond_kwargs, IP-Adapter's list of image embeddings,
    # ControlNet's tuple of residuals; unbatched tensors and plain values ride along untouched.
    from sagfast.core.batch import gather_batch, slice_batch

    full, keep = 4, slice(2, 4)  # the guide rows: the second half, as DiT's [cond, uncond] has them
    rows = lambda *shape: torch.randn(full, *shape)  # noqa: E731
    call = {
        "encoder_hidden_states": rows(3, 5),
        "added_cond_kwargs": {"text_embeds": rows(6), "image_embeds": [rows(1, 7), rows(2, 7)]},
        "down_block_additional_residuals": (rows(8, 2, 2), rows(8, 1, 1)),
        "timestep_cond": torch.ones(1, 3),  # not batched: batch dim 1
        "cross_attention_kwargs": {"scale": 0.5},
    }
    sliced, extended = slice_batch(call, full, keep), gather_batch(call, full, [slice(None), keep])
    flat = pytree.tree_leaves
    for original, cut, longer in zip(flat(call), flat(sliced), flat(extended)):
        if torch.is_tensor(original) and original.shape[0] == full:
            assert torch.equal(cut, original[keep])
            assert torch.equal(longer, torch.cat([original, original[keep]]))
        else:
            assert cut is original and longer is original
    assert isinstance(sliced["added_cond_kwargs"]["image_embeds"], list)
    assert isinstance(sliced["down_block_additional_residuals"], tuple)
