"""The pipeline is left exactly as it was: after disable, after an error inside a call, after a call."""

import pytest
import torch
from components import prompt_embeds, sd_pipeline

import sagfast

CALL = dict(height=48, width=40, num_inference_steps=2, output_type="latent")


def run(pipe, n=1, **extra):
    pe, ne = prompt_embeds(n)
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, generator=torch.Generator().manual_seed(0), **CALL, **extra).images


def snapshot(unet):
    return {
        "processors": {name: id(p) for name, p in unet.attn_processors.items()},
        "forward_patched": "forward" in unet.__dict__,
        "hooks": (len(unet._forward_hooks), len(unet._forward_pre_hooks)),
        "block_hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in unet.named_modules()},
    }


def test_disable_restores_the_original_objects():
    pipe = sd_pipeline()
    unet, config, cls = pipe.unet, dict(pipe.config), type(pipe)
    before = snapshot(unet)
    sagfast.enable(pipe)
    assert sagfast.is_enabled(pipe) and pipe.unet is unet  # the user's own model object, always
    enabled = snapshot(unet)
    run(pipe)
    assert snapshot(unet) == enabled, "a call must leave the UNet's processors, forward and hooks untouched"
    sagfast.disable(pipe)
    assert pipe.unet is unet and not sagfast.is_enabled(pipe) and type(pipe) is cls
    assert snapshot(unet) == before
    assert dict(pipe.config) == config and "_sagfast_config" not in pipe.__dict__
    sagfast.disable(pipe)  # disabling a disabled pipeline is a no-op
    assert pipe.unet is unet


def test_state_restored_after_an_error_inside_the_capture_call():
    pipe = sagfast.enable(sd_pipeline())
    unet = pipe.unet
    before = snapshot(unet)

    def boom(module, args):
        raise RuntimeError("boom inside the main pass")

    # Raise in the mid block's resnet, inside the main pass with the capture armed.
    handle = unet.mid_block.resnets[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        run(pipe)
    handle.remove()
    assert snapshot(unet) == before
    assert sagfast.attention.capture.ACTIVE.get() is None and sagfast.api.ACTIVE_CALL.get() is None
    assert torch.equal(run(pipe), run(sagfast.enable(sd_pipeline())))  # and it still works


def test_guided_context_restores_previous_state_even_on_error():
    pipe = sd_pipeline()
    unet, cls = pipe.unet, type(pipe)
    with pytest.raises(RuntimeError, match="inside"):
        with sagfast.guided(pipe, scale=0.3):
            assert sagfast.api.config_of(pipe).scale == 0.3
            raise RuntimeError("inside")
    assert pipe.unet is unet and type(pipe) is cls and not sagfast.is_enabled(pipe)
    sagfast.enable(pipe, scale=0.9)
    with sagfast.guided(pipe, scale=0.2):
        assert sagfast.api.config_of(pipe).scale == 0.2
    assert sagfast.api.config_of(pipe).scale == 0.9


def test_enable_twice_replaces_the_config():
    pipe = sd_pipeline()
    unet = pipe.unet
    sagfast.enable(pipe, scale=0.2)
    sagfast.enable(pipe, scale=0.6, blur_sigma=2.0)
    assert pipe.unet is unet
    assert sagfast.api.config_of(pipe) == sagfast.SAGConfig(scale=0.6, blur_sigma=2.0)
    assert torch.equal(run(pipe), run(sagfast.enable(sd_pipeline(), scale=0.6, blur_sigma=2.0)))


def test_two_pipelines_do_not_share_state():
    a, b = sd_pipeline(), sd_pipeline()
    b_shared = type(a)(**a.components)  # a second pipeline on the same UNet object
    b_shared.set_progress_bar_config(disable=True)
    ref_a = run(sagfast.enable(sd_pipeline(), scale=0.3))
    ref_b = run(sagfast.enable(sd_pipeline(), scale=1.0))
    sagfast.enable(a, scale=0.3)
    sagfast.enable(b, scale=1.0)
    sagfast.enable(b_shared, scale=1.0)
    out_a, out_b, out_shared, out_a2 = run(a), run(b), run(b_shared), run(a)
    assert torch.equal(out_a, ref_a) and torch.equal(out_a2, ref_a)
    assert torch.equal(out_b, ref_b) and torch.equal(out_shared, ref_b)
    assert not torch.equal(out_a, out_b)
    # Disabling one pipeline leaves the capture for the other one on the shared UNet.
    sagfast.disable(a)
    assert torch.equal(run(b_shared), ref_b)


def test_input_tensors_are_not_mutated():
    pipe = sagfast.enable(sd_pipeline())
    pe, ne = prompt_embeds(1)
    latents = torch.randn(1, 4, 24, 20, generator=torch.Generator().manual_seed(2))
    copies = [t.clone() for t in (pe, ne, latents)]
    pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=latents, **CALL)
    assert all(torch.equal(a, b) for a, b in zip((pe, ne, latents), copies))


def test_dropin_leaves_its_unet_as_it_was_after_each_call():
    from components import sd_components

    pipe = sagfast.StableDiffusionSAGPipeline(**sd_components())
    pipe.set_progress_bar_config(disable=True)
    unet, config = pipe.unet, dict(pipe.config)
    before = snapshot(unet)
    first = run(pipe)
    assert pipe.unet is unet and dict(pipe.config) == config and snapshot(unet) == before
    assert torch.equal(run(pipe), first)
    assert not torch.equal(run(pipe, sag_scale=0.5), first)


def test_a_copy_of_the_dropin_pipeline_guides_itself():
    import copy
    import pickle

    from components import sd_components
    from diffusers import EulerDiscreteScheduler

    pipe = sagfast.StableDiffusionSAGPipeline(**sd_components(scheduler_cls=EulerDiscreteScheduler))
    pipe.set_progress_bar_config(disable=True)
    first = run(pipe)
    twin = copy.deepcopy(pipe)
    assert torch.equal(run(twin), first)
    del pipe
    assert torch.equal(run(twin), first)
    assert torch.equal(run(pickle.loads(pickle.dumps(twin))), first)


def test_drop_graphs_empties_the_models_graph_cache():
    from sagfast.engine.cuda_graph import graphs_of

    pipe = sagfast.enable(sd_pipeline())
    graphs = graphs_of(pipe.unet)
    graphs._graphs["a graph"] = object()  # graphs are captured on CUDA only; any entry will do
    sagfast.drop_graphs(pipe)
    assert graphs._graphs == {} and graphs_of(pipe.unet) is graphs


def test_model_cpu_offload_hooks_stay_on_the_users_unet():
    # diffusers' model offload re-installs accelerate's hooks on the pipeline's components at the end of
    # every call (inside the guided call): they must land on the UNet, never on the guided stand-in.
    # accelerate runs the offload on the CPU too (device="cpu"), so this is checked here as on a GPU.
    pipe = sd_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    unet = pipe.unet
    plain = run(pipe)
    reference = run(sagfast.enable(sd_pipeline()))  # the same weights, no offload
    sagfast.enable(pipe)
    for _ in range(2):
        assert torch.equal(run(pipe), reference)
        assert pipe.unet is unet and "_hf_hook" in unet.__dict__
    sagfast.disable(pipe)
    assert torch.equal(run(pipe), plain)
    with sagfast.guided(pipe):
        assert torch.equal(run(pipe), reference)
    assert pipe.unet is unet and "_hf_hook" in unet.__dict__ and torch.equal(run(pipe), plain)
    # Offload switched on after SAG.
    late = sagfast.enable(sd_pipeline())
    late.enable_model_cpu_offload(device="cpu")
    assert torch.equal(run(late), reference) and "_hf_hook" in late.unet.__dict__
    sagfast.disable(late)
    assert "_hf_hook" in late.unet.__dict__ and torch.equal(run(late), plain)


def test_dropin_pipeline_with_model_cpu_offload():
    from components import sd_components

    reference = run(sagfast.StableDiffusionSAGPipeline(**sd_components()))
    pipe = sagfast.StableDiffusionSAGPipeline(**sd_components())
    pipe.enable_model_cpu_offload(device="cpu")
    unet = pipe.unet
    assert torch.equal(run(pipe), reference)
    assert torch.equal(run(pipe), reference)
    assert pipe.unet is unet and "_hf_hook" in unet.__dict__


def test_group_offload_runs_with_sag_and_survives_disable():
    # (Sequential CPU offload is not checked: with torch 2.13 CPU and accelerate 1.15 it fails on a plain
    # pipeline already, in accelerate's post_forward.)
    reference, plain = run(sagfast.enable(sd_pipeline())), run(sd_pipeline())
    pipe = sd_pipeline()
    pipe.unet.enable_group_offload(
        onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )
    sagfast.enable(pipe)
    assert torch.equal(run(pipe), reference)
    sagfast.disable(pipe)
    assert torch.equal(run(pipe), plain)
