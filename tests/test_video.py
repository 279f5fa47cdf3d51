"""SAG on video: CogVideoXPipeline on tiny random components (3 latent frames of 8x10, the capture
layer's map 3 x 4 x 5 after the 2x2 patch), built from configs, offline.

Per mode: it runs; SAG changes the output; `scale=0` is the plain pipeline bitwise; `disable` gives
back the plain output and the original processors; batched mode makes one transformer call per step
after the first (counted by a hook). The degraded input of every exact step equals the spec computed
here: the mass of the video keys from the video queries (the dense joint softmax after RoPE, text
tokens first), the mask on the layer's (t, h, w) grid, upsampled per frame, the predicted x0 blurred
per frame by diffusers' SAG blur, blended and re-noised at the scheduler's noise level
(v-prediction).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import gaussian_blur_2d

import sagfast

STEPS = 3
HEIGHT, WIDTH, FRAMES = 64, 80, 9  # latent 8 x 10, 3 latent frames


def cogvideox():
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=16,
        num_layers=3,
        sample_width=10,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=8,
        use_rotary_positional_embeddings=True,
    ).eval()
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    # The scheduler as CogVideoX-2b ships it: v-prediction, zero terminal SNR, trailing spacing.
    scheduler = CogVideoXDDIMScheduler(
        prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0, timestep_spacing="trailing", clip_sample=False
    )
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(guidance=6.0):
    g = torch.Generator().manual_seed(1)
    pe, ne = torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g)
    return dict(
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )


def run(pipe, **kw):
    return pipe(**call(**kw)).frames


class Recorder:
    """Every transformer call (input, timestep, output) and the capture layer's inputs."""

    def __init__(self, pipe):
        self.model = pipe.components["transformer"]
        self.attn = self.model.transformer_blocks[len(self.model.transformer_blocks) // 2].attn1
        self.calls, self.layer = [], []
        self.handles = [
            self.model.register_forward_pre_hook(self.pre, with_kwargs=True),
            self.model.register_forward_hook(self.post, with_kwargs=True),
            self.attn.register_forward_pre_hook(lambda m, a, k: self.layer.append(dict(k)), with_kwargs=True),
        ]

    def pre(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.calls.append({"x": x.detach().clone(), "t": kwargs["timestep"]})

    def post(self, module, args, kwargs, output):
        self.calls[-1]["out"] = (output[0] if isinstance(output, tuple) else output.sample).detach().clone()

    def remove(self):
        for handle in self.handles:
            handle.remove()


def heads(t, n):
    b, length, inner = t.shape
    return t.view(b, length, n, inner // n).transpose(1, 2)


def dense_video_mass(attn, inputs, rows):
    """Mass of the video keys from the video queries, averaged over heads, each query's softmax over ALL
    keys (text first, then video; RoPE on the video part), from the dense map: the spec."""
    ehs, hs = inputs["encoder_hidden_states"][rows], inputs["hidden_states"][rows]
    joint = torch.cat([ehs, hs], 1)
    q, k = heads(attn.to_q(joint), attn.heads), heads(attn.to_k(joint), attn.heads)
    q, k = attn.norm_q(q), attn.norm_k(k)
    n = ehs.shape[1]
    rope = inputs["image_rotary_emb"]
    q = torch.cat([q[:, :, :n], apply_rotary_emb(q[:, :, n:], rope)], 2)
    k = torch.cat([k[:, :, :n], apply_rotary_emb(k[:, :, n:], rope)], 2)
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return p[:, :, n:, n:].sum(2).mean(1)


def expected_degraded(attn, inputs, x, v, abar, guide):
    """[B, F, C, H, W] model layout in, the spec's degraded input out (v-prediction, VP schedule)."""
    xg, vg = x[guide].double(), v[guide].double()
    b, f, c, h, w = xg.shape
    mass = dense_video_mass(attn, inputs, guide)
    # The layer's (t, h, w) grid, (3, 4, 5) here: one map frame per latent frame (no temporal patch),
    # (h, w) over the 2x2 patch, tokens in (frame, row, column) order.
    mask = (mass > 1.0).double().reshape(b * f, 1, h // 2, w // 2)
    mask = F.interpolate(mask, (h, w)).reshape(b, f, 1, h, w)  # nearest, per frame
    a, s = abar**0.5, (1 - abar) ** 0.5
    x0, eps = a * xg - s * vg, s * xg + a * vg
    blurred = gaussian_blur_2d(x0.reshape(b * f, c, h, w), 9, 1.0).reshape(b, f, c, h, w)  # per frame
    return a * (blurred * mask + x0 * (1 - mask)) + s * eps, mask


@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_sag_runs_changes_the_video_and_leaves_the_pipeline_as_it_was(mode):
    pipe = cogvideox()
    processors = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    plain = run(pipe)
    sagfast.enable(pipe, scale=0.0, mode=mode)
    assert torch.equal(run(pipe), plain), "scale=0 must be exactly the plain pipeline"
    sagfast.enable(pipe, scale=0.75, mode=mode)
    sizes = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: sizes.append((a[0] if a else k["hidden_states"]).shape[0]), with_kwargs=True
    )
    guided = run(pipe)
    handle.remove()
    assert torch.isfinite(guided).all() and (guided - plain).abs().max().item() > 1e-2
    assert sizes == ([2, 1] * STEPS if mode == "exact" else [2, 1] + [3] * (STEPS - 1))
    sagfast.disable(pipe)
    assert torch.equal(run(pipe), plain)
    assert {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")} == processors


def test_exact_sag_follows_the_spec_on_the_video_grid():
    pipe = sagfast.enable(cogvideox(), scale=1.0)
    rec = Recorder(pipe)
    try:
        run(pipe)
    finally:
        rec.remove()
    main, degraded = rec.calls[0::2], rec.calls[1::2]
    assert [c["x"].shape[0] for c in rec.calls] == [2, 1] * STEPS
    guide = slice(0, 1)  # [uncond, cond]: the guide branch is uncond
    partial = False
    for i, (m, d) in enumerate(zip(main, degraded)):
        t = int(m["t"].reshape(-1)[0])
        abar = pipe.scheduler.alphas_cumprod[t].double().item()
        with torch.no_grad():
            want, mask = expected_degraded(rec.attn, rec.layer[2 * i], m["x"], m["out"], abar, guide)
        got = d["x"].double()
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), i
        partial |= bool(mask.any()) and not bool(mask.all())
    assert partial, "the test never saw a mask that blurs part of the video"


def test_pag_and_seg_are_refused_on_cogvideox():
    for field in ("pag_scale", "seg_scale"):
        with pytest.raises(ValueError, match="CogVideoX"):
            sagfast.enable(cogvideox(), **{field: 1.0})
