"""Half precision on CPU: the pipeline runs in the model's dtype, the attention mass and mask in fp32."""

import pytest
import torch
from components import prompt_embeds, sd_pipeline
from diffusers.models.attention_processor import Attention

import sagfast
from sagfast.attention.processors import SAGCaptureProcessor


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_capture_mass_is_fp32_for_half_inputs(dtype):
    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=4, dim_head=16).eval().to(dtype)
    x = torch.randn(2, 48, 64).to(dtype)
    proc = SAGCaptureProcessor(2)
    with torch.no_grad():
        out = proc(attn, x)
        q = attn.to_q(x).view(2, 48, 4, 16).transpose(1, 2).float()
        k = attn.to_k(x).view(2, 48, 4, 16).transpose(1, 2).float()
    assert out.dtype == dtype and proc.mass.dtype == torch.float32
    dense = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1).sum(2).mean(1)
    # The mass of the half-precision q, k is computed in fp32 (the lse SDPA returns is fp32 too): it
    # matches an fp32 dense computation far closer than a half-precision mass could (~1e-3 rounding).
    torch.testing.assert_close(proc.mass, dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_half_precision_pipeline_runs_on_cpu(dtype, mode):
    pipe = sd_pipeline().to(dtype=dtype)
    pe, ne = prompt_embeds(1)
    call = dict(
        prompt_embeds=pe.to(dtype), negative_prompt_embeds=ne.to(dtype), height=48, width=40, num_inference_steps=2, output_type="latent"
    )
    plain = pipe(generator=torch.Generator().manual_seed(0), **call).images
    sagfast.enable(pipe, mode=mode)
    out = pipe(generator=torch.Generator().manual_seed(0), **call).images
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - plain.float()).abs().max() > 1e-2
