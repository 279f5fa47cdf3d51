"""GPU-only checks: half precision end to end, CUDA graphs, xformers. Skipped without CUDA;
bench/gpu_checks.sh runs them on a machine that has one."""

import pytest
import torch
from components import prompt_embeds, sd_pipeline

import sagfast
from sagfast.engine.cuda_graph import graphs_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CALL = dict(height=64, width=48, num_inference_steps=4, output_type="latent")


def run(pipe, dtype=torch.float32, n=1):
    pe, ne = prompt_embeds(n)
    gen = torch.Generator("cuda").manual_seed(0)
    return pipe(prompt_embeds=pe.to("cuda", dtype), negative_prompt_embeds=ne.to("cuda", dtype), generator=gen, **CALL).images


def cuda_pipe(dtype=torch.float32):
    pipe = sd_pipeline().to("cuda", dtype)
    return pipe


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_half_precision_end_to_end(dtype, mode):
    pipe = cuda_pipe(dtype)
    plain = run(pipe, dtype)
    sagfast.enable(pipe, mode=mode)
    out = run(pipe, dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - plain.float()).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_cuda_graph_matches_eager_and_recaptures_on_new_shapes(mode):
    pipe = sagfast.enable(cuda_pipe(), mode=mode)
    eager = run(pipe)
    sagfast.enable(pipe, mode=mode, cuda_graph=True)
    graphed = run(pipe)
    again = run(pipe)  # replays the graphs captured by the first call
    tol = 1e-4 * max(1.0, eager.abs().max().item())
    assert (graphed - eager).abs().max().item() <= tol
    assert torch.equal(graphed, again)
    graphs = graphs_of(pipe.unet)._graphs
    n = len(graphs)
    assert n == (2 if mode == "batched" else 1)
    run(pipe, n=2)  # another batch size: new graphs
    assert len(graphs_of(pipe.unet)._graphs) == 2 * n


@pytest.mark.parametrize(
    "config, graphs",
    [
        (dict(mode="exact", pag_scale=3.0), 1),
        (dict(mode="exact", pag_scale=3.0, exact_pag_pass="degraded"), 1),
        (dict(mode="batched", pag_scale=3.0, pag_adaptive_scale=0.001), 2),
        (dict(mode="batched", pag_scale=3.0, cfg_interval=(0.0, 0.5)), 4),
    ],
    ids=["exact", "exact-degraded", "batched-adaptive", "batched-cfg-interval"],
)
def test_cuda_graph_of_sag_plus_pag_matches_eager(config, graphs):
    # batched-cfg-interval: [u, c] exact, then batched, then the cond rows alone exact, then batched.
    pipe = sagfast.enable(cuda_pipe(), **config)
    eager = run(pipe)
    sagfast.enable(pipe, **config, cuda_graph=True)
    graphed = run(pipe)
    again = run(pipe)
    tol = 1e-4 * max(1.0, eager.abs().max().item())
    assert (graphed - eager).abs().max().item() <= tol
    assert torch.equal(graphed, again)
    assert len(graphs_of(pipe.unet)._graphs) == graphs


def test_cuda_graph_capture_failure_falls_back_with_a_warning():
    pipe = sagfast.enable(cuda_pipe())
    eager = run(pipe)
    sagfast.enable(pipe, cuda_graph=True)
    # A host synchronization inside the step makes capture impossible.
    handle = pipe.unet.mid_block.register_forward_hook(lambda m, a, o: o.sum().item() and None)
    try:
        with pytest.warns(RuntimeWarning, match="without a CUDA graph: capture of the exact step failed"):
            out = run(pipe)
    finally:
        handle.remove()
    assert (out - eager).abs().max().item() <= 1e-4 * max(1.0, eager.abs().max().item())
    # The failed capture handed the stream back: the rest of the pipeline ran on the caller's stream.
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


def test_dropin_pipeline_replays_its_graphs_in_the_next_call():
    from components import sd_components

    comps = sd_components()
    pipe = sagfast.StableDiffusionSAGPipeline(**comps).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    config = sagfast.SAGConfig(cuda_graph=True)
    pe, ne = prompt_embeds(1)

    def go():
        generator = torch.Generator("cuda").manual_seed(0)
        return pipe(prompt_embeds=pe.cuda(), negative_prompt_embeds=ne.cuda(), sag_config=config, generator=generator, **CALL).images

    first = go()
    graphs = dict(graphs_of(pipe.unet)._graphs)
    assert len(graphs) == 1
    assert torch.equal(go(), first)
    assert graphs_of(pipe.unet)._graphs == graphs  # replayed, not captured again


def test_graphs_are_dropped_when_the_weights_move():
    pipe = sagfast.enable(cuda_pipe(), cuda_graph=True)
    run(pipe)
    assert len(graphs_of(pipe.unet)._graphs) == 1
    pipe.to(torch.float16)  # new weight tensors: the old graphs would read freed memory
    out = run(pipe, torch.float16)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    (key,) = graphs_of(pipe.unet)._graphs  # one graph, captured anew for the fp16 sample (the first input)
    assert key[2][0][:3] == ("tensor", (2, 4, 32, 24), torch.float16)  # the tiny VAE scales by 2


def test_xformers_capture_matches_sdpa():
    pytest.importorskip("xformers")
    pipe = sagfast.enable(cuda_pipe(torch.float16))
    sdpa = run(pipe, torch.float16)
    pipe.unet.enable_xformers_memory_efficient_attention()
    xf = run(pipe, torch.float16)
    assert torch.isfinite(xf).all()
    assert (xf.float() - sdpa.float()).abs().max().item() <= 2e-2 * max(1.0, sdpa.float().abs().max().item())


def test_a_failed_capture_leaves_the_other_graphs_capturable():
    pipe = sagfast.enable(cuda_pipe(), mode="batched")
    eager = run(pipe)
    sagfast.enable(pipe, mode="batched", cuda_graph=True)

    # A host sync in the first (exact) step only, whose main pass has batch 2B = 2: its capture fails,
    # and the batched step (batch 3) must still be captured from the same pool afterwards.
    def hook(module, args, output):
        if output.shape[0] == 2:
            output.sum().item()  # returns None: the output is kept (a value returned would replace it)

    handle = pipe.unet.mid_block.register_forward_hook(hook)
    try:
        with pytest.warns(RuntimeWarning, match="capture of the exact step failed"):
            out = run(pipe)
    finally:
        handle.remove()
    assert [key[0][0] for key in graphs_of(pipe.unet)._graphs] == ["batched"]
    assert (out - eager).abs().max().item() <= 1e-4 * max(1.0, eager.abs().max().item())


def test_graphs_are_refused_under_autocast():
    pipe = sagfast.enable(cuda_pipe(), cuda_graph=True)
    with torch.autocast("cuda", dtype=torch.float16):
        with pytest.warns(RuntimeWarning, match="torch.autocast"):
            out = run(pipe)
    assert torch.isfinite(out).all() and not graphs_of(pipe.unet)._graphs


@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_graphs_captured_under_inference_mode_replay_outside_it(mode):
    eager = run(sagfast.enable(cuda_pipe(), mode=mode))
    pipe = sagfast.enable(cuda_pipe(), mode=mode, cuda_graph=True)
    with torch.inference_mode():
        first = run(pipe)
    second = run(pipe)  # replays the graphs (static buffers and batched state made under inference_mode)
    with torch.inference_mode():
        third = run(pipe)
    tol = 1e-4 * max(1.0, eager.abs().max().item())
    assert all((out - eager).abs().max().item() <= tol for out in (first, second, third))


def test_graphs_stay_with_the_model_across_guided_blocks():
    pipe = cuda_pipe()
    with sagfast.guided(pipe, cuda_graph=True):
        first = run(pipe)
    graphs = dict(graphs_of(pipe.unet)._graphs)
    assert len(graphs) == 1
    with sagfast.guided(pipe, cuda_graph=True):
        assert torch.equal(run(pipe), first)
    assert graphs_of(pipe.unet)._graphs == graphs  # replayed in the second block, not captured again
