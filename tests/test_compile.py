"""torch.compile of the UNet with sagfast enabled: no graph break inside the capture layer and ops."""

import pytest
import torch
from components import prompt_embeds, sd_pipeline

import sagfast

CALL = dict(height=48, width=40, num_inference_steps=2, output_type="latent")


def run(pipe):
    pe, ne = prompt_embeds(1)
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, generator=torch.Generator().manual_seed(0), **CALL).images


def compiled_run(compile_backend, sag_backend, mode="exact", **config):
    torch._dynamo.reset()
    pipe = sd_pipeline()
    # fullgraph=True: any graph break in the UNet's forward, the capture processor, the lse SDPA call
    # or the attention-mass op dispatch is an error, not a silent split.
    pipe.unet = torch.compile(pipe.unet, backend=compile_backend, fullgraph=True)
    sagfast.enable(pipe, backend=sag_backend, mode=mode, **config)
    return run(pipe)


@pytest.mark.parametrize("sag_backend", ["auto", "cpp", "torch"])
def test_compiled_unet_without_graph_breaks(sag_backend):
    eager = run(sagfast.enable(sd_pipeline(), backend=sag_backend))
    out = compiled_run("eager", sag_backend)
    assert (out - eager).abs().max().item() <= 1e-5 * max(1.0, eager.abs().max().item())


def test_compiled_unet_with_sag_and_pag_without_graph_breaks():
    # The perturbed rows are cut out and put back inside the capture switch, in the compiled forward
    # (batched: the one call has main, perturbed and degraded rows; ~40 s, so one mode).
    config = dict(mode="batched", pag_scale=3.0, pag_layers=["mid", "up_blocks.0"])
    eager = run(sagfast.enable(sd_pipeline(), **config))
    out = compiled_run("eager", "auto", **config)
    assert (out - eager).abs().max().item() <= 1e-5 * max(1.0, eager.abs().max().item())


def test_explain_counts_no_graph_break_in_the_capture_call():
    from sagfast.attention.processors import SAGCaptureProcessor

    torch._dynamo.reset()
    unet = sd_pipeline().unet
    unet.mid_block.attentions[0].transformer_blocks[0].attn1.set_processor(SAGCaptureProcessor(1))
    pe, ne = prompt_embeds(1)
    explain = torch._dynamo.explain(unet)(torch.randn(2, 4, 24, 20), torch.tensor(500), encoder_hidden_states=torch.cat([ne, pe]))
    assert explain.graph_break_count == 0, [str(r.reason) for r in explain.break_reasons]
    assert explain.graph_count == 1


@pytest.mark.slow
def test_compiled_unet_with_inductor():
    # Inductor compiles C++ for each graph (main pass with the capture processor, degraded pass):
    # minutes on 2 cores, so one mode only; CI runs it (the `slow` marker is not deselected).
    eager = run(sagfast.enable(sd_pipeline()))
    out = compiled_run("inductor", "auto")
    assert (out - eager).abs().max().item() <= 1e-3 * max(1.0, eager.abs().max().item())
