"""SAG on video: CogVideoXPipeline (3 latent frames of 8x10, the capture layer's map 3 x 4 x 5 after
the 2x2 patch) and LTXPipeline (packed tokens, 3 latent frames of 8x16, flow matching) on tiny random
components built from configs, offline.

Per mode: it runs; SAG changes the output; `scale=0` is the plain pipeline bitwise; `disable` gives
back the plain output and the original processors; batched mode makes one transformer call per step
after the first (counted by a hook). The degraded input of every exact step equals the spec computed
here: the mass of the video keys from the video queries (the dense softmax after RoPE; CogVideoX's
text tokens first in one joint softmax), the mask on the layer's (t, h, w) grid, upsampled per frame,
the predicted x0 blurred per frame by diffusers' SAG blur, blended and re-noised at the scheduler's
noise level (CogVideoX: v-prediction, variance preserving; LTX: flow matching).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLLTXVideo,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    LTXPipeline,
    LTXVideoTransformer3DModel,
)
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb as ltx_rotary
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


def ltx():
    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=3,
        caption_channels=16,
    ).eval()
    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5,
        patch_size=1,
        patch_size_t=1,  # with two scaling levels: 4x spatial, 4x temporal compression
    ).eval()
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(name="cogvideox", guidance=6.0):
    g = torch.Generator().manual_seed(1)
    pe, ne = torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g)
    common = dict(num_inference_steps=STEPS, guidance_scale=guidance, output_type="latent", generator=torch.Generator().manual_seed(0))
    if name == "ltx":  # 32x64 pixels, 9 frames: latent 3 x 8 x 16 (LTX asks for multiples of 32)
        mask = torch.ones(1, 8, dtype=torch.long)
        text = dict(prompt_embeds=pe, prompt_attention_mask=mask, negative_prompt_embeds=ne, negative_prompt_attention_mask=mask)
        return dict(**text, height=32, width=64, num_frames=9, **common)
    return dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=HEIGHT, width=WIDTH, num_frames=FRAMES, **common)


PIPELINES = {"cogvideox": cogvideox, "ltx": ltx}


def run(pipe, name="cogvideox", **kw):
    return pipe(**call(name, **kw)).frames


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


def time_blur(x0, sigma_t, kernel_size=9):
    """x0 [B, F, C, H, W] blurred over its frames: Gaussian weights over a window of kernel_size frames cut
    to 2F - 1, each frame the weighted sum of its neighbours, the frame index reflected at the ends."""
    f = x0.shape[1]
    size = min(kernel_size, 2 * f - 1)
    offsets = range(-(size // 2), size // 2 + 1)
    weights = [math.exp(-0.5 * (o / sigma_t) ** 2) for o in offsets]
    total = sum(weights)
    out = torch.zeros_like(x0)
    for i in range(f):
        for o, wt in zip(offsets, weights):
            j = abs(i + o)
            j = 2 * (f - 1) - j if j > f - 1 else j
            out[:, i] += (wt / total) * x0[:, j]
    return out


def expected_degraded(attn, inputs, x, v, abar, guide, sigma_t=0.0):
    """[B, F, C, H, W] model layout in, the spec's degraded input out (v-prediction, VP schedule); with
    `sigma_t` the blur is over time as well (the time blur, then each frame's)."""
    xg, vg = x[guide].double(), v[guide].double()
    b, f, c, h, w = xg.shape
    mass = dense_video_mass(attn, inputs, guide)
    # The layer's (t, h, w) grid, (3, 4, 5) here: one map frame per latent frame (no temporal patch),
    # (h, w) over the 2x2 patch, tokens in (frame, row, column) order.
    mask = (mass > 1.0).double().reshape(b * f, 1, h // 2, w // 2)
    mask = F.interpolate(mask, (h, w)).reshape(b, f, 1, h, w)  # nearest, per frame
    a, s = abar**0.5, (1 - abar) ** 0.5
    x0, eps = a * xg - s * vg, s * xg + a * vg
    blurred = time_blur(x0, sigma_t) if sigma_t else x0
    blurred = gaussian_blur_2d(blurred.reshape(b * f, c, h, w), 9, 1.0).reshape(b, f, c, h, w)  # per frame
    return a * (blurred * mask + x0 * (1 - mask)) + s * eps, mask


def check_guides_and_restores(pipe, go, mode, sizes):
    """What must hold for every video pipeline: `scale=0` is the plain call bitwise, SAG changes the
    output, the model calls per step are `sizes` (counted by a hook), and `disable` gives back the
    plain output and the original attention processors. `go()` makes the call and returns its frames."""
    processors = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    plain = go()
    sagfast.enable(pipe, scale=0.0, mode=mode)
    assert torch.equal(go(), plain), "scale=0 must be exactly the plain pipeline"
    sagfast.enable(pipe, scale=0.75, mode=mode)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).shape[0]), with_kwargs=True
    )
    guided = go()
    handle.remove()
    assert torch.isfinite(guided).all() and (guided - plain).abs().max().item() > 1e-2
    assert seen == sizes
    sagfast.disable(pipe)
    assert torch.equal(go(), plain)
    assert {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")} == processors


@pytest.mark.parametrize("mode", ["exact", "batched"])
@pytest.mark.parametrize("name", ["cogvideox", "ltx"])
def test_sag_runs_changes_the_video_and_leaves_the_pipeline_as_it_was(name, mode):
    pipe = PIPELINES[name]()
    check_guides_and_restores(pipe, lambda: run(pipe, name), mode, [2, 1] * STEPS if mode == "exact" else [2, 1] + [3] * (STEPS - 1))


@pytest.mark.parametrize("sigma_t", [0.0, 1.5])
def test_exact_sag_follows_the_spec_on_the_video_grid(sigma_t):
    pipe = sagfast.enable(cogvideox(), scale=1.0, blur_sigma_t=sigma_t)
    rec = Recorder(pipe)
    try:
        run(pipe)
    finally:
        rec.remove()
    main, degraded = rec.calls[0::2], rec.calls[1::2]
    assert [c["x"].shape[0] for c in rec.calls] == [2, 1] * STEPS
    guide = slice(0, 1)  # [uncond, cond]: the guide branch is uncond
    partial = seen = False
    for i, (m, d) in enumerate(zip(main, degraded)):
        t = int(m["t"].reshape(-1)[0])
        abar = pipe.scheduler.alphas_cumprod[t].double().item()
        with torch.no_grad():
            want, mask = expected_degraded(rec.attn, rec.layer[2 * i], m["x"], m["out"], abar, guide, sigma_t)
        got = d["x"].double()
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), i
        partial |= bool(mask.any()) and not bool(mask.all())
        if sigma_t:
            with torch.no_grad():
                per_frame, _ = expected_degraded(rec.attn, rec.layer[2 * i], m["x"], m["out"], abar, guide)
            seen |= (per_frame - want).abs().max().item() > 1e-3
    assert partial, "the test never saw a mask that blurs part of the video"
    assert seen or not sigma_t, "the time blur never changed the degraded input"


@pytest.mark.parametrize("frames, kernel", [(1, 9), (2, 9), (5, 3), (7, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_blur_time_equals_its_reference_on_odd_shapes(frames, kernel, dtype):
    from sagfast.ops import blur_time

    x = torch.randn(2, 3, frames, 5, 7, generator=torch.Generator().manual_seed(frames)).to(dtype)
    want = time_blur(x.double().transpose(1, 2), 1.3, kernel).transpose(1, 2)
    got = blur_time(x, kernel, 1.3)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def dense_ltx_mass(attn, inputs, rows):
    """Mass of every key (attn1 is self-attention over the video tokens), averaged over heads, from the
    dense softmax after LTX's RoPE on q and k: the spec."""
    hs = inputs["hidden_states"][rows]
    q, k = attn.norm_q(attn.to_q(hs)), attn.norm_k(attn.to_k(hs))
    rope = tuple(r[rows] if r.shape[0] > 1 else r for r in inputs["image_rotary_emb"])
    q, k = ltx_rotary(q, rope), ltx_rotary(k, rope)
    q, k = heads(q, attn.heads), heads(k, attn.heads)
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return p.sum(2).mean(1)


def test_exact_sag_follows_the_flow_spec_on_ltx_packed_tokens():
    pipe = sagfast.enable(ltx(), scale=1.0)
    rec = Recorder(pipe)
    try:
        run(pipe, "ltx")
    finally:
        rec.remove()
    main, degraded = rec.calls[0::2], rec.calls[1::2]
    assert [c["x"].shape[0] for c in rec.calls] == [2, 1] * STEPS
    f, h, w = 3, 8, 16
    partial = False

    def unpack(x):  # diffusers' own unpacking: [B, F*H*W, C] -> [B, C, F, H, W]
        return LTXPipeline._unpack_latents(x, f, h, w, 1, 1)

    for i, (m, d) in enumerate(zip(main, degraded)):
        sigma = pipe.scheduler.sigmas[i].double().item()
        xg, vg = unpack(m["x"][:1]).double(), unpack(m["out"][:1]).double()
        with torch.no_grad():
            mass = dense_ltx_mass(rec.attn, rec.layer[2 * i], slice(0, 1))
        mask = (mass > 1.0).double().reshape(1, 1, f, h, w)  # patch 1: the token grid is the latent's
        x0, eps = xg - sigma * vg, xg + (1 - sigma) * vg
        frames = x0.transpose(1, 2).reshape(f, 8, h, w)
        blurred = gaussian_blur_2d(frames, 9, 1.0).reshape(1, f, 8, h, w).transpose(1, 2)  # per frame
        want = (1 - sigma) * (blurred * mask + x0 * (1 - mask)) + sigma * eps
        got = unpack(d["x"]).double()
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), i
        partial |= bool(mask.any()) and not bool(mask.all())
    assert partial, "the test never saw a mask that blurs part of the video"


@pytest.mark.parametrize("name", list(PIPELINES))
def test_seg_is_refused_on_video(name):
    with pytest.raises(ValueError, match=r"sagfast does not run SEG on .*: its query blur lays the tokens on an \(h, w\) grid"):
        sagfast.enable(PIPELINES[name](), seg_scale=1.0, seg_layers="attn1")


def test_an_unknown_pipeline_is_told_the_video_pipelines():
    from sagfast.families import family_of_class

    with pytest.raises(ValueError, match="CogVideoXPipeline, LTXPipeline, WanPipeline, WanImageToVideoPipeline, HunyuanVideoPipeline"):
        family_of_class(type("MochiPipeline", (), {}))


# -- Wan 2.1: no CFG on WanPipeline (two sequential calls per step), CFG through the modular guider --


def wan(seed=0):
    # The README's offline Wan components (examples/offline_pipeline.py), without a text encoder: the
    # tests pass prompt embeddings.
    from diffusers import WanPipeline
    from offline_pipeline import tiny_wan_transformer, tiny_wan_vae, wan_scheduler

    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=tiny_wan_vae(), transformer=tiny_wan_transformer(seed), scheduler=wan_scheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_call():
    g = torch.Generator().manual_seed(1)
    pe, ne = torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g)
    latents = torch.randn(1, 4, 3, 8, 10, generator=torch.Generator().manual_seed(7))  # 9 frames of 64x80; map 3 x 4 x 5
    return dict(latents=latents, prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=80, num_frames=9, num_inference_steps=STEPS)


def modular_wan(pipe, guider):
    from diffusers.modular_pipelines.wan import WanBlocks

    blocks = WanBlocks()
    blocks.sub_blocks.pop("text_encoder")  # takes prompt embeddings
    blocks.sub_blocks.pop("decode")  # the latents are the result (its decode reads a 16-channel VAE's statistics)
    modular = blocks.init_pipeline()
    modular.update_components(transformer=pipe.transformer, scheduler=pipe.scheduler, guider=guider)
    return modular


@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_wan_without_cfg_runs_and_leaves_the_pipeline_as_it_was(mode):
    pipe = wan()

    def go():
        return pipe(**wan_call(), guidance_scale=1.0, output_type="latent").frames

    # cond, then degraded; batched: one call
    check_guides_and_restores(pipe, go, mode, [1, 1] * STEPS if mode == "exact" else [1, 1] + [2] * (STEPS - 1))


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_wan_refuses_a_per_image_list_of_the_wrong_length_before_any_model_call(guidance):
    # With CFG, Wan's first cond call runs the model before any step is planned: the length is
    # checked before it (the docs: a wrong length is refused before the first model call).
    pipe = sagfast.enable(wan(), scale=[0.5, 0.75])

    def go():
        with pytest.raises(ValueError, match=r"scale has 2 values, but this call makes 1 images"):
            pipe(**wan_call(), guidance_scale=guidance, output_type="latent")

    _, sizes = calls_per_denoiser(pipe, go, names=("transformer",))
    assert sizes == {"transformer": []}


@pytest.mark.parametrize("mode, per_step", [("exact", [1, 2, 1] + [2, 1] * (STEPS - 1)), ("batched", [1, 2, 1] + [3] * (STEPS - 1))])
def test_wan_cfg_as_two_calls_per_step_equals_the_modular_guider(mode, per_step):
    # WanPipeline's CFG is a cond call then an uncond call per step. sagfast joins both into one
    # [uncond, cond] batch (the negative embeddings from the previous step's uncond call), so that the
    # pipeline's own CFG line gives cfg + s * (u - o_deg); the reference is the modular Wan pipeline
    # with SelfAttentionGuidance (one call per condition), whose degraded input
    # test_wan_modular_guider_with_cfg_follows_the_spec checks against the spec.
    from diffusers.guiders import ClassifierFreeGuidance

    from sagfast.guiders import SelfAttentionGuidance

    reference = wan()
    modular = modular_wan(reference, ClassifierFreeGuidance(guidance_scale=5.0))
    cfg = modular(**wan_call(), output="latents")
    modular.update_components(guider=SelfAttentionGuidance(guidance_scale=5.0, sag_scale=0.75, mode=mode).bind(modular))
    want = modular(**wan_call(), output="latents")
    pipe = sagfast.enable(wan(), scale=0.75, mode=mode)
    sizes = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: sizes.append((a[0] if a else k["hidden_states"]).shape[0]), with_kwargs=True
    )
    got = pipe(**wan_call(), guidance_scale=5.0, output_type="latent").frames
    handle.remove()
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    assert (want - cfg).abs().max().item() > 100 * bound  # SAG moved the latents
    # Step 1: the cond call alone, then [uncond, cond] and the degraded rows; later steps: the joined
    # step at the cond call (batched: [uncond, cond, degraded] in one call), the uncond call free.
    assert sizes == per_step


def test_wan_modular_guider_without_cfg_equals_sagfast_enable_on_wan_pipeline():
    from diffusers.guiders import ClassifierFreeGuidance

    from sagfast.guiders import SelfAttentionGuidance

    pipe = wan()
    modular = modular_wan(pipe, ClassifierFreeGuidance(guidance_scale=1.0))
    modular.update_components(guider=SelfAttentionGuidance(guidance_scale=1.0, sag_scale=0.75).bind(modular))
    got = modular(**wan_call(), output="latents")
    want = sagfast.enable(wan(), scale=0.75)(**wan_call(), guidance_scale=1.0, output_type="latent").frames
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def wan_mass(attn, hs):
    """Mass of every key of Wan's attn1, averaged over heads, from the dense softmax after the RMS
    norms and Wan's interleaved RoPE (written here from WanAttnProcessor's formula): the spec."""
    x, rope = hs["hidden_states"], hs["rotary_emb"]
    q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1))

    def rotate(t, cos, sin):
        out = torch.empty_like(t)
        t1, t2 = t[..., 0::2], t[..., 1::2]
        out[..., 0::2] = t1 * cos[..., 0::2] - t2 * sin[..., 1::2]
        out[..., 1::2] = t1 * sin[..., 1::2] + t2 * cos[..., 0::2]
        return out

    q, k = rotate(q, *rope).transpose(1, 2), rotate(k, *rope).transpose(1, 2)
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return p.sum(2).mean(1)


def wan_expected(attn, layer_inputs, x, v, sigma, mass=None, patch=2):
    """The spec's degraded input of Wan's guide row (flow matching: x0 = x - sigma v, eps = x + (1 - sigma) v),
    x and v [1, C, F, H, W] (the predicted channels), and its mask on the latent; `mass` (HunyuanVideo's)
    on the (F, H / patch, W / patch) map, else Wan's."""
    mass = wan_mass(attn, layer_inputs) if mass is None else mass
    f, h, w = x.shape[2:]
    c = x.shape[1]
    mask = (mass > 1.0).double().reshape(f, 1, h // patch, w // patch)  # (t, h, w) = (F, H/2, W/2) on Wan
    mask = F.interpolate(mask, (h, w)).reshape(1, f, 1, h, w).transpose(1, 2)  # nearest, per frame
    x0, eps = x - sigma * v, x + (1 - sigma) * v
    blurred = gaussian_blur_2d(x0.transpose(1, 2).reshape(f, c, h, w), 9, 1.0).reshape(1, f, c, h, w).transpose(1, 2)
    return (1 - sigma) * (blurred * mask + x0 * (1 - mask)) + sigma * eps, mask


def test_wan_modular_guider_with_cfg_follows_the_spec():
    from diffusers.guiders import ClassifierFreeGuidance

    from sagfast.guiders import SelfAttentionGuidance

    pipe = wan()
    modular = modular_wan(pipe, ClassifierFreeGuidance(guidance_scale=5.0))
    cfg = modular(**wan_call(), output="latents")
    modular.update_components(guider=SelfAttentionGuidance(guidance_scale=5.0, sag_scale=1.0).bind(modular))
    model, attn = pipe.transformer, pipe.transformer.blocks[1].attn1
    calls, layer = [], []
    # The input as the model's first layer sees it: the guider's pre-hook on the model replaces the
    # degraded condition's latent, after any hook registered here would read it.
    handles = [
        model.patch_embedding.register_forward_pre_hook(lambda m, a: calls.append({"x": a[0].clone()})),
        model.register_forward_hook(lambda m, a, k, out: calls[-1].update(out=out[0].clone()), with_kwargs=True),
        attn.register_forward_pre_hook(lambda m, a, k: layer.append({"hidden_states": a[0], "rotary_emb": a[3]}), with_kwargs=True),
    ]
    try:
        got = modular(**wan_call(), output="latents")
    finally:
        for handle in handles:
            handle.remove()
    assert (got - cfg).abs().max().item() > 1e-2
    assert len(calls) == 3 * STEPS  # cond, uncond, degraded: one call each
    partial = False
    for i in range(STEPS):
        u, d = calls[3 * i + 1], calls[3 * i + 2]  # the guide branch is uncond
        sigma = pipe.scheduler.sigmas[i].double().item()
        with torch.no_grad():
            want, mask = wan_expected(attn, layer[3 * i + 1], u["x"].double(), u["out"].double(), sigma)
        assert (d["x"].double() - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), i
        partial |= bool(mask.any()) and not bool(mask.all())
    assert partial


@pytest.mark.parametrize("name, stack", [("ltx", "transformer_blocks"), ("wan", "blocks")])
def test_a_video_layer_that_is_not_there_is_refused_with_the_layers_there_are(name, stack):
    pipe = (ltx if name == "ltx" else wan)()
    with pytest.raises(ValueError, match=rf"{stack}\.0\.attn1"):
        sagfast.enable(pipe, layers=f"{stack}.7")


@pytest.mark.parametrize("rule", ["apg", "cfg_zero_star"])
def test_wan_cfg_rules_equal_diffusers_guiders_on_the_modular_wan_pipeline(rule):
    # With the two branches joined into one batch, sagfast's CFG rules run on Wan too; the reference is
    # diffusers' own guider on the modular Wan pipeline (one call per condition).
    from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance

    guider = {
        "apg": AdaptiveProjectedGuidance(guidance_scale=5.0, adaptive_projected_guidance_momentum=-0.5, eta=0.0),
        "cfg_zero_star": ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=1),
    }[rule]
    config = {"apg": dict(apg_momentum=-0.5, apg_eta=0.0), "cfg_zero_star": dict(zero_init_steps=1)}[rule]
    want = modular_wan(wan(), guider)(**wan_call(), output="latents")
    cfg = modular_wan(wan(), ClassifierFreeGuidance(guidance_scale=5.0))(**wan_call(), output="latents")
    got = sagfast.enable(wan(), scale=0.0, cfg_rule=rule, **config)(**wan_call(), guidance_scale=5.0, output_type="latent").frames
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    assert (want - cfg).abs().max().item() > 100 * bound


# -- Wan 2.2: a high-noise transformer, then transformer_2 below boundary_ratio --


def calls_per_denoiser(pipe, run, names=("transformer", "transformer_2")) -> tuple:
    """(what `run()` returned, {denoiser attribute: the batch size of each of its model calls})."""
    sizes = {name: [] for name in names}
    handles = [
        getattr(pipe, name).register_forward_pre_hook(
            lambda m, a, k, name=name: sizes[name].append((a[0] if a else k["hidden_states"]).shape[0]), with_kwargs=True
        )
        for name in names
    ]
    try:
        return run(), sizes
    finally:
        for handle in handles:
            handle.remove()


def boundary_in_the_middle(pipe, steps=4):
    """Sets Wan 2.2's boundary_ratio between the two middle timesteps of a `steps`-step call: half the
    steps for each transformer."""
    pipe.scheduler.set_timesteps(steps)
    t = pipe.scheduler.timesteps
    pipe.register_to_config(boundary_ratio=float(t[steps // 2 - 1] + t[steps // 2]) / 2 / pipe.scheduler.config.num_train_timesteps)


def wan22():
    from diffusers import WanPipeline
    from offline_pipeline import tiny_wan_transformer

    first = wan()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=first.vae,
        transformer=first.transformer,
        transformer_2=tiny_wan_transformer(seed=1),  # the same tiny config, other random weights
        scheduler=first.scheduler,
        boundary_ratio=0.5,
    )
    pipe.set_progress_bar_config(disable=True)
    boundary_in_the_middle(pipe)
    return pipe


def modular_wan22(reference, guider, guider_2):
    from diffusers.modular_pipelines.wan import Wan22Blocks

    blocks = Wan22Blocks()
    blocks.sub_blocks.pop("text_encoder")
    blocks.sub_blocks.pop("decode")
    modular = blocks.init_pipeline()
    modular.register_to_config(boundary_ratio=reference.config.boundary_ratio)
    modular.update_components(transformer=reference.transformer, transformer_2=reference.transformer_2, scheduler=reference.scheduler)
    bind = {k: g.bind(modular) if hasattr(g, "bind") else g for k, g in dict(guider=guider, guider_2=guider_2).items()}
    modular.update_components(**bind)
    return modular


def sag_guider(g, **fields):
    from sagfast.guiders import SelfAttentionGuidance

    return SelfAttentionGuidance(guidance_scale=g, sag_scale=0.75, **fields)


WAN22_CASES = {
    # name: (sagfast fields, the modular pipeline's two guiders (high, low noise), guidance_scale_2,
    #        model calls of transformer and transformer_2)
    "sag-exact": (dict(mode="exact"), lambda: (sag_guider(5.0), sag_guider(3.0)), 3.0, [1, 2, 1, 2, 1], [2, 1, 2, 1]),
    "sag-batched": (
        dict(mode="batched"),
        lambda: (sag_guider(5.0, mode="batched"), sag_guider(3.0, mode="batched")),
        3.0,
        [1, 2, 1, 3],
        [2, 1, 3],
    ),
    # Steps are counted over the whole call (diffusers' guiders count them so): SAG on the first three
    # quarters reaches the low-noise stage's first step (2 of 4), not its second (counted from the
    # stage's own start, both would be in).
    "sag-interval": (
        dict(mode="exact", sag_interval=(0.0, 0.75)),
        lambda: (sag_guider(5.0, start=0.0, stop=0.75), sag_guider(3.0, start=0.0, stop=0.75)),
        3.0,
        [1, 2, 1, 2, 1],
        [2, 1, 2],
    ),
    # guidance_scale_2 = 1: the pipeline's line is the cond call's output; it is guided as without
    # CFG, and the uncond call makes no model call.
    "sag-low-noise-without-cfg": (dict(mode="exact"), lambda: (sag_guider(5.0), sag_guider(1.0)), 1.0, [1, 2, 1, 2, 1], [1, 1, 1, 1]),
    # sagfast's own CFG rule with the low-noise stage's scale.
    "apg": (
        dict(scale=0.0, cfg_rule="apg", apg_eta=0.0),
        lambda: tuple(__import__("diffusers").guiders.AdaptiveProjectedGuidance(guidance_scale=g, eta=0.0) for g in (5.0, 3.0)),
        3.0,
        [1, 2, 2],
        [2, 2],
    ),
}


@pytest.mark.parametrize("case", list(WAN22_CASES))
def test_wan22_guides_both_transformers_and_equals_the_modular_wan22_guiders(case):
    fields, guiders, g2, first, second = WAN22_CASES[case]
    arguments = dict(wan_call(), num_inference_steps=4)
    want = modular_wan22(wan22(), *guiders())(**arguments, output="latents")

    pipe = wan22()
    call = dict(arguments, guidance_scale=5.0, guidance_scale_2=g2, output_type="latent")
    plain = pipe(**call).frames
    processors = {n: m.processor for n, m in pipe.transformer_2.named_modules() if hasattr(m, "processor")}
    sagfast.enable(pipe, **{"scale": 0.75, **fields})
    got, sizes = calls_per_denoiser(pipe, lambda: pipe(**call).frames)
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    assert (want - plain).abs().max().item() > 100 * bound
    # The low-noise stage joins its branches from its first step (the uncond inputs carry over); its
    # first SAG step is exact (its own model has no previous evaluation).
    assert sizes == {"transformer": first, "transformer_2": second}
    sagfast.disable(pipe)
    assert torch.equal(pipe(**call).frames, plain)
    assert {n: m.processor for n, m in pipe.transformer_2.named_modules() if hasattr(m, "processor")} == processors


# -- Wan 2.1 I2V: the image's latents concatenated to the latent's channels, CLIP image embeddings --


def wan_i2v():
    from diffusers import WanImageToVideoPipeline
    from offline_pipeline import tiny_wan_transformer, tiny_wan_vae, wan_scheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    # In: the latent's 4 channels, the first-frame mask's 4 (the VAE's temporal factor), the image
    # latent's 4; CLIP image embeddings of 8 through added k / v projections.
    transformer = tiny_wan_transformer(in_channels=12, image_dim=8, added_kv_proj_dim=16)
    torch.manual_seed(0)
    encoder = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16)
    ).eval()  # 4 patches and the class token: image embeddings [1, 5, 8]
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_wan_vae(),  # the image is encoded through it
        scheduler=wan_scheduler(),
        image_processor=processor,
        image_encoder=encoder,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_i2v_call():
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    # Wan's image cross-attention takes the text as its last 512 tokens (hard-coded in WanAttnProcessor).
    text = dict(prompt_embeds=torch.randn(1, 512, 16, generator=g), negative_prompt_embeds=torch.randn(1, 512, 16, generator=g))
    image = Image.fromarray((torch.rand(64, 80, 3, generator=g) * 255).to(torch.uint8).numpy())
    latents = torch.randn(1, 4, 3, 8, 10, generator=torch.Generator().manual_seed(7))
    return dict(
        image=image, latents=latents, height=64, width=80, num_frames=9,
        num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent", **text,
    )  # fmt: skip


def test_wan_i2v_degraded_rows_take_the_guide_rows_image_latents_and_follow_the_spec():
    pipe = wan_i2v()
    plain = pipe(**wan_i2v_call()).frames
    sagfast.enable(pipe, scale=1.0)
    model, attn = pipe.transformer, pipe.transformer.blocks[1].attn1
    calls, layer = [], []

    def record(module, args, kwargs):
        calls.append({name: v for name, v in kwargs.items() if torch.is_tensor(v)})
        if args:  # sagfast hands the sample positionally
            calls[-1]["hidden_states"] = args[0]

    handles = [
        model.register_forward_pre_hook(record, with_kwargs=True),
        model.register_forward_hook(lambda m, a, k, out: calls[-1].update(out=out[0].clone()), with_kwargs=True),
        attn.register_forward_pre_hook(lambda m, a, k: layer.append({"hidden_states": a[0][:1], "rotary_emb": a[3]}), with_kwargs=True),
    ]
    try:
        got = pipe(**wan_i2v_call()).frames
    finally:
        for handle in handles:
            handle.remove()
    assert (got - plain).abs().max().item() > 1e-2
    # Step 1: the cond call alone, the joined [uncond, cond], the degraded rows; then joined and degraded.
    assert [c["hidden_states"].shape[0] for c in calls] == [1, 2, 1] + [2, 1] * (STEPS - 1)
    mains = [1] + [3 + 2 * i for i in range(STEPS - 1)]
    partial = False
    for i, at in enumerate(mains):
        main, degraded = calls[at], calls[at + 1]
        x, v = main["hidden_states"][:1].double(), main["out"][:1].double()  # the guide row: uncond
        sigma = pipe.scheduler.sigmas[i].double().item()
        with torch.no_grad():
            want, mask = wan_expected(attn, layer[at], x[:, :4], v, sigma)
        xd = degraded["hidden_states"].double()
        assert (xd[:, :4] - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), i
        # Every other input of the degraded rows is the guide row's: the image latents, the negative
        # prompt, the image embeddings, the timestep.
        assert torch.equal(xd[:, 4:], x[:, 4:])
        for name in ("encoder_hidden_states", "encoder_hidden_states_image", "timestep"):
            assert torch.equal(degraded[name], main[name][:1]), name
        assert torch.equal(degraded["encoder_hidden_states"], wan_i2v_call()["negative_prompt_embeds"])
        partial |= bool(mask.any()) and not bool(mask.all())
    assert partial
    sagfast.disable(pipe)
    assert torch.equal(pipe(**wan_i2v_call()).frames, plain)


# -- HunyuanVideo: guidance distilled (one branch per call), a text padding mask in its joint attention --


def hunyuan():
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=3,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    ).eval()
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    ).eval()
    pipe = HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hunyuan_call(true_cfg=False):
    g = torch.Generator().manual_seed(1)
    pe, pooled = torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, generator=g)
    # 5 of 8 text tokens valid: the padded keys are masked in the joint attention.
    text = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, prompt_attention_mask=torch.tensor([[1] * 5 + [0] * 3]))
    if true_cfg:
        negative = dict(
            negative_prompt_embeds=-pe, negative_pooled_prompt_embeds=-pooled, negative_prompt_attention_mask=torch.tensor([[1] * 7 + [0]])
        )
        text.update(negative, true_cfg_scale=4.0)
    return dict(
        **text,
        height=64,
        width=80,
        num_frames=9,
        num_inference_steps=STEPS,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )  # latent 3 x 8 x 10, patch 1: the map is 3 x 8 x 10


@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_hunyuan_video_runs_and_leaves_the_pipeline_as_it_was(mode):
    pipe = hunyuan()
    sizes = [1, 1] * STEPS if mode == "exact" else [1, 1] + [2] * (STEPS - 1)
    check_guides_and_restores(pipe, lambda: pipe(**hunyuan_call()).frames, mode, sizes)


def hunyuan_mass(attn, inputs, rows):
    """Mass of the video keys from the video queries of HunyuanVideo's joint attention (video then text
    tokens, RoPE on the video part, the padded text keys masked), from the dense softmax: the spec."""
    hs, ehs = inputs["hidden_states"][rows], inputs["encoder_hidden_states"][rows]
    keep = inputs["attention_mask"][rows].reshape(hs.shape[0], -1).bool()
    rope = inputs["image_rotary_emb"]
    q, k = attn.norm_q(attn.to_q(hs).unflatten(2, (attn.heads, -1))), attn.norm_k(attn.to_k(hs).unflatten(2, (attn.heads, -1)))
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    eq = attn.norm_added_q(attn.add_q_proj(ehs).unflatten(2, (attn.heads, -1)))
    ek = attn.norm_added_k(attn.add_k_proj(ehs).unflatten(2, (attn.heads, -1)))
    q, k = torch.cat([q, eq], 1).transpose(1, 2).double(), torch.cat([k, ek], 1).transpose(1, 2).double()
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    p = torch.softmax(scores.masked_fill(~keep[:, None, None, :], float("-inf")), dim=-1)
    n = hs.shape[1]
    return p[:, :, :n, :n].sum(2).mean(1)


@pytest.mark.parametrize("true_cfg", [False, True])
def test_hunyuan_video_exact_sag_follows_the_spec_with_the_text_padding_mask(true_cfg):
    pipe = sagfast.enable(hunyuan(), scale=1.0)
    model, attn = pipe.transformer, pipe.transformer.transformer_blocks[1].attn
    calls, layer = [], []

    def record(module, args, kwargs):
        calls.append({"x": (args[0] if args else kwargs["hidden_states"]).clone()})

    handles = [
        model.register_forward_pre_hook(record, with_kwargs=True),
        model.register_forward_hook(lambda m, a, k, out: calls[-1].update(out=out[0].clone()), with_kwargs=True),
        attn.register_forward_pre_hook(lambda m, a, k: layer.append(dict(k)), with_kwargs=True),
    ]
    try:
        pipe(**hunyuan_call(true_cfg))
    finally:
        for handle in handles:
            handle.remove()
    # Without true CFG: [cond], then the degraded rows. With it: step 1's cond call alone, then the
    # joined [uncond, cond] and the degraded rows at every step (the guide branch: uncond, row 0).
    sizes = [c["x"].shape[0] for c in calls]
    assert sizes == ([1, 2, 1] + [2, 1] * (STEPS - 1) if true_cfg else [1, 1] * STEPS)
    mains = [1 + 2 * i if true_cfg else 2 * i for i in range(STEPS)]
    partial = False
    for i, at in enumerate(mains):
        x, v = calls[at]["x"][:1].double(), calls[at]["out"][:1].double()
        sigma = pipe.scheduler.sigmas[i].double().item()
        inputs = layer[at]
        keep = inputs["attention_mask"]
        assert not keep.reshape(keep.shape[0], -1)[0].all()  # the guide row's text is padded: the mask matters
        with torch.no_grad():
            want, mask = wan_expected(attn, None, x, v, sigma, mass=hunyuan_mass(attn, inputs, slice(0, 1)), patch=1)
        got = calls[at + 1]["x"].double()
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), i
        partial |= bool(mask.any()) and not bool(mask.all())
    assert partial


@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_hunyuan_video_true_cfg_gives_cfg_plus_sag_of_the_uncond_branch(mode):
    # True CFG is two calls per step, cond then uncond, combined by the pipeline as
    # neg + w * (cond - neg). sagfast joins them; whatever it hands each call, the prediction the
    # scheduler receives must be u + w * (c - u) + s * (u - o_deg), from the joined call's rows.
    from recording import check_joined_cfg

    pipe = sagfast.enable(hunyuan(), scale=0.75, mode=mode)
    check_joined_cfg(pipe, lambda: pipe(**hunyuan_call(true_cfg=True)), images=1, w=4.0, s=0.75, mode=mode, steps=STEPS)


@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_wan_i2v_runs_and_leaves_the_pipeline_as_it_was(mode):
    pipe = wan_i2v()
    sizes = [1, 2, 1] + ([2, 1] if mode == "exact" else [3]) * (STEPS - 1)
    check_guides_and_restores(pipe, lambda: pipe(**wan_i2v_call()).frames, mode, sizes)


def test_wan22_image_to_video_guides_both_transformers():
    # Wan 2.2 I2V (A14B's layout): no image encoder, the image latents in the input channels, and a
    # low-noise transformer_2 below boundary_ratio; both transformers get their guided calls.
    from diffusers import WanImageToVideoPipeline
    from offline_pipeline import tiny_wan_transformer, tiny_wan_vae, wan_scheduler

    pipe = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_wan_vae(),
        scheduler=wan_scheduler(),
        image_processor=None,
        image_encoder=None,
        transformer=tiny_wan_transformer(in_channels=12),
        transformer_2=tiny_wan_transformer(seed=1, in_channels=12),
        boundary_ratio=0.5,
    )
    pipe.set_progress_bar_config(disable=True)
    boundary_in_the_middle(pipe)
    arguments = {k: v for k, v in wan_i2v_call().items() if k != "prompt_embeds"}
    text = dict(prompt_embeds=wan_call()["prompt_embeds"], negative_prompt_embeds=wan_call()["negative_prompt_embeds"])
    arguments = dict(arguments, **text, num_inference_steps=4)
    plain = pipe(**arguments).frames
    sagfast.enable(pipe, scale=0.75, mode="batched")
    guided, sizes = calls_per_denoiser(pipe, lambda: pipe(**arguments).frames)
    assert (guided - plain).abs().max().item() > 1e-2
    assert sizes == {"transformer": [1, 2, 1, 3], "transformer_2": [2, 1, 3]}
    sagfast.disable(pipe)
    assert torch.equal(pipe(**arguments).frames, plain)


def test_an_enabled_wan22_pipeline_shows_its_own_models_and_copies_guide_themselves():
    import copy

    pipe = sagfast.enable(wan22(), scale=0.75, mode="batched")
    first, second = pipe.__dict__["transformer"], pipe.__dict__["transformer_2"]
    assert pipe.transformer is first and pipe.transformer_2 is second  # outside a call: the user's models
    assert pipe.components["transformer"] is first and pipe.components["transformer_2"] is second
    call = dict(wan_call(), num_inference_steps=4, guidance_scale=5.0, guidance_scale_2=3.0, output_type="latent")
    copied = copy.deepcopy(pipe)
    assert sagfast.is_enabled(copied) and copied.transformer_2 is not second
    assert torch.equal(copied(**call).frames, pipe(**call).frames)
    sagfast.disable(pipe)
    assert not sagfast.is_enabled(pipe) and sagfast.is_enabled(copied)
