"""One safe lifecycle: saving, state_dict, copying, pickling, pipelines built from an enabled one,
threads, inference_mode, unknown batch layouts, the random mask's seed and the drop-in's components,
each as a user (or a server) would hit it."""

import copy
import pickle
import threading

import pytest
import torch
from components import prompt_embeds, scheduler_config, sd_components, sd_pipeline
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPAGPipeline, StableDiffusionPipeline

import sagfast

CALL = dict(height=48, width=40, num_inference_steps=3, output_type="latent")


def run(pipe, seed=0, n=1, **extra):
    pe, ne = prompt_embeds(n)
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, generator=torch.Generator().manual_seed(seed), **CALL, **extra).images


def euler_pipeline():
    return sd_pipeline(scheduler_cls=EulerDiscreteScheduler)


def test_save_pretrained_of_an_enabled_pipeline_loads_as_the_plain_pipeline(tmp_path):
    pipe = sagfast.enable(sd_pipeline())
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert pipe.config["unet"] == ("diffusers", "UNet2DConditionModel") and pipe.config["_class_name"] == "StableDiffusionPipeline"
    # The tiny pipeline has no text encoder, tokenizer or safety checker: diffusers saves none, and
    # they are passed as None to load it (as for any pipeline saved without them).
    none = dict(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, **none)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is StableDiffusionPipeline and not sagfast.is_enabled(loaded)
    assert torch.equal(run(loaded), run(sd_pipeline()))
    # And after disable too.
    sagfast.disable(pipe)
    pipe.save_pretrained(tmp_path / "again")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "again", **none)
    again.set_progress_bar_config(disable=True)
    assert torch.equal(run(again), run(sd_pipeline()))


def test_state_dict_of_an_enabled_unet_is_the_plain_unets_and_weights_hot_swap():
    pipe = sagfast.enable(sd_pipeline())
    plain = sd_pipeline(seed=1).unet.state_dict()
    assert list(pipe.unet.state_dict()) == list(plain)
    pipe.unet.load_state_dict(plain)
    assert torch.equal(run(pipe), run(sagfast.enable(sd_pipeline(seed=1))))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_guides_itself_like_a_fresh_enabled_pipeline(how):
    config = dict(scale=0.6, mode="batched")
    pipe = sagfast.enable(euler_pipeline(), **config)
    run(pipe, guidance_scale=1.0)  # the original's last call had CFG off: the copy must not read that
    twin = copy.deepcopy(pipe) if how == "deepcopy" else pickle.loads(pickle.dumps(pipe))
    assert sagfast.is_enabled(twin) and type(twin).__name__ == "StableDiffusionPipeline"
    assert twin.unet is not pipe.unet and twin.scheduler is not pipe.scheduler
    want = run(sagfast.enable(euler_pipeline(), **config))
    assert torch.equal(run(twin), want)
    pipe.scheduler = DDIMScheduler.from_config(scheduler_config())  # the original changes ...
    del pipe  # ... and goes away
    assert torch.equal(run(twin), want)
    sagfast.disable(twin)
    assert type(twin) is StableDiffusionPipeline and torch.equal(run(twin), run(euler_pipeline()))


def test_from_pipe_and_components_give_pipelines_guided_by_their_own_state():
    pipe = sagfast.enable(sd_pipeline())
    guided = run(pipe)
    plain_euler = run(euler_pipeline())
    # from_pipe with another scheduler: a plain pipeline on the same UNet ...
    other = StableDiffusionPipeline.from_pipe(pipe, scheduler=EulerDiscreteScheduler.from_config(scheduler_config()))
    other.set_progress_bar_config(disable=True)
    assert not sagfast.is_enabled(other) and other.unet is pipe.unet
    assert torch.equal(run(other), plain_euler)
    # ... which, enabled, uses its own scheduler and its own CFG state.
    sagfast.enable(other)
    assert torch.equal(run(other), run(sagfast.enable(euler_pipeline())))
    assert torch.equal(run(other, guidance_scale=1.0), run(sagfast.enable(euler_pipeline()), guidance_scale=1.0))
    # A pipeline built from components is plain.
    built = StableDiffusionPipeline(**pipe.components)
    built.set_progress_bar_config(disable=True)
    assert built.unet is pipe.unet and torch.equal(run(built), run(sd_pipeline()))
    assert torch.equal(run(pipe), guided)  # and the first pipeline is unaffected


def test_two_threads_on_pipelines_sharing_one_unet_give_the_sequential_results():
    a = euler_pipeline()
    b = StableDiffusionPipeline(**{**a.components, "scheduler": DDIMScheduler.from_config(scheduler_config())})
    b.set_progress_bar_config(disable=True)
    processors = dict(a.unet.attn_processors)
    sagfast.enable(a, scale=0.75)
    sagfast.enable(b, scale=0.3, mode="batched")
    enabled_processors = dict(a.unet.attn_processors)
    want_a, want_b = run(a), run(b, guidance_scale=1.0)
    results, errors = {"a": [], "b": []}, []

    def worker(name, pipe, extra):
        try:
            for _ in range(3):
                results[name].append(run(pipe, **extra))
        except Exception as e:  # noqa: BLE001 - reported below, with the thread's name
            errors.append((name, e))

    threads = [threading.Thread(target=worker, args=("a", a, {})), threading.Thread(target=worker, args=("b", b, {"guidance_scale": 1.0}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(torch.equal(out, want_a) for out in results["a"]) and len(results["a"]) == 3
    assert all(torch.equal(out, want_b) for out in results["b"]) and len(results["b"]) == 3
    assert dict(a.unet.attn_processors) == enabled_processors
    sagfast.disable(a)
    assert dict(a.unet.attn_processors) == enabled_processors  # b still guides the shared UNet
    sagfast.disable(b)
    assert dict(a.unet.attn_processors) == processors


@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_inference_mode_and_normal_calls_mix_in_any_order(mode):
    pipe = sagfast.enable(sd_pipeline(), mode=mode)
    want = run(sagfast.enable(sd_pipeline(), mode=mode))
    with torch.inference_mode():
        assert torch.equal(run(pipe), want)
    assert torch.equal(run(pipe), want)
    with torch.inference_mode():
        assert torch.equal(run(pipe), want)
    assert torch.equal(run(pipe), want)


def test_a_pipeline_with_an_unknown_batch_layout_is_refused_untouched():
    components = sd_components()
    pag = StableDiffusionPAGPipeline(**components, pag_applied_layers=["mid"])
    cls, processors = type(pag), dict(pag.unet.attn_processors)
    with pytest.raises(ValueError, match=r"does not know the batch layout of StableDiffusionPAGPipeline.*\[uncond, cond, perturbed\]"):
        sagfast.enable(pag)
    assert type(pag) is cls and not sagfast.is_enabled(pag) and dict(pag.unet.attn_processors) == processors


def test_random_mask_follows_the_calls_seed():
    pipe = sagfast.enable(sd_pipeline(), mask="random")
    first = run(pipe, seed=3)
    assert torch.equal(run(pipe, seed=3), first)
    assert torch.equal(run(sagfast.enable(sd_pipeline(), mask="random"), seed=3), first)
    # The mask's draws are the seed's: with the same latents, another seed gives another mask.
    latents = torch.randn(1, 4, 24, 20, generator=torch.Generator().manual_seed(7))
    a, b = (run(pipe, seed=s, latents=latents) for s in (3, 4))
    assert not torch.equal(a, b)


def dropin_components():
    components = sd_components()
    # A schedule StableDiffusionPipeline's constructor would rewrite in place (steps_offset, clip_sample).
    components["scheduler"] = DDIMScheduler.from_config({**scheduler_config(), "steps_offset": 0, "clip_sample": True})
    return components


def test_the_dropin_leaves_its_components_as_they_were_and_matches_diffusers():
    from diffusers.pipelines.deprecated.stable_diffusion_sag import StableDiffusionSAGPipeline as DiffusersSAG

    components = dropin_components()
    scheduler_before = dict(components["scheduler"].config)
    unet_before = dict(components["unet"].config)
    processors = dict(components["unet"].attn_processors)
    ours = sagfast.StableDiffusionSAGPipeline(**components)
    ours.set_progress_bar_config(disable=True)
    assert dict(components["scheduler"].config) == scheduler_before and dict(components["unet"].config) == unet_before
    pe, ne = prompt_embeds(2)
    kwargs = dict(
        prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=48, num_inference_steps=4, sag_scale=0.75, output_type="latent"
    )
    out = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert dict(components["scheduler"].config) == scheduler_before
    assert dict(components["unet"].attn_processors) == processors
    ref_pipe = DiffusersSAG(**dropin_components())
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
