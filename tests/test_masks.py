"""The paper's masking ablation: global blur ("blur guidance") and a random mask."""

import torch
from components import prompt_embeds, sd_pipeline
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import gaussian_blur_2d
from recording import recording

import sagfast

CALL = dict(height=48, width=40, num_inference_steps=2, output_type="latent")


def run(pipe):
    pe, ne = prompt_embeds(1)
    with recording(pipe) as rec:
        out = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, generator=torch.Generator().manual_seed(0), **CALL).images
    return out, rec.calls


def test_global_mask_blurs_everything():
    pipe = sagfast.enable(sd_pipeline(), mask="global")
    _, calls = run(pipe)
    main, degraded = calls[0], calls[1]
    abar = pipe.scheduler.alphas_cumprod[int(main["kwargs"]["timestep"])].item()
    eps = main["out"][:1]
    x0 = (main["sample"][:1] - (1 - abar) ** 0.5 * eps) / abar**0.5
    want = abar**0.5 * gaussian_blur_2d(x0, 9, 1.0) + (1 - abar) ** 0.5 * eps
    assert (degraded["sample"] - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_random_mask_blurs_about_the_requested_share():
    pipe = sagfast.enable(sd_pipeline(), mask="random", random_mask_ratio=0.4)
    out_random, calls = run(pipe)
    main, degraded = calls[0], calls[1]
    abar = pipe.scheduler.alphas_cumprod[int(main["kwargs"]["timestep"])].item()
    eps = main["out"][:1]
    x0 = (main["sample"][:1] - (1 - abar) ** 0.5 * eps) / abar**0.5
    x0d = (degraded["sample"] - (1 - abar) ** 0.5 * eps) / abar**0.5
    blurred = (x0d - x0).abs().amax(dim=1) > 1e-4  # pixels the degrade changed
    # The 12x10 map upsampled 2x: each map pixel is a 2x2 block of latent pixels, all blurred or none.
    blocks = blurred.reshape(1, 12, 2, 10, 2).permute(0, 1, 3, 2, 4).reshape(1, 12, 10, 4)
    assert torch.equal(blocks.all(-1), blocks.any(-1))
    share = blocks.all(-1).float().mean().item()
    assert 0.25 < share < 0.55, share
    out_attention, _ = run(sagfast.enable(sd_pipeline()))
    assert not torch.equal(out_random, out_attention)
