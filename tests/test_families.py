"""SAG on the variance-preserving families beyond Stable Diffusion: unconditional UNet2DModel
(DDPMPipeline, DDIMPipeline), DiT and PixArt, on tiny random components built from configs.

For each family and CFG setting: enable runs, scale=0 is exactly the plain pipeline, SAG changes the
output, and every degraded input equals the spec computed here independently of sagfast (a dense
softmax of the capture layer's q and k, diffusers' own blur, nearest upsampling, the schedule's
alphas_cumprod); outside the mask the degraded input is the model input. Batched mode makes one
model call per step after the first, and with eps_prev equal to the current eps it builds the exact
degraded input.
"""

import pytest
import torch
import torch.nn.functional as F
from components import tiny_vae
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    UNet2DModel,
)
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import gaussian_blur_2d

import sagfast
from sagfast.api import config_of, guided_call


def ddim():
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)


def unconditional(pipeline_cls):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False) if pipeline_cls is DDPMPipeline else ddim()
    pipe = pipeline_cls(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit():
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    ).eval()
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=ddim())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart():
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=3,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=16,
        caption_channels=24,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    ).eval()
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer, scheduler=ddim())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(name, cfg_on):
    g = torch.Generator().manual_seed(0)
    steps = 3
    if name in ("ddpm", "ddim"):
        return dict(batch_size=2, generator=g, num_inference_steps=steps, output_type="np")
    if name == "dit":
        return dict(class_labels=[1, 7], guidance_scale=4.0 if cfg_on else 1.0, generator=g, num_inference_steps=steps, output_type="pt")
    e = torch.Generator().manual_seed(1)
    pe, ne = torch.randn(2, 5, 24, generator=e), torch.randn(2, 5, 24, generator=e)
    mask = torch.ones(2, 5, dtype=torch.long)
    return dict(
        prompt_embeds=pe,
        negative_prompt=None,
        negative_prompt_embeds=ne,
        prompt_attention_mask=mask,
        negative_prompt_attention_mask=mask,
        guidance_scale=4.5 if cfg_on else 1.0,
        height=32,
        width=32,
        use_resolution_binning=False,
        generator=g,
        num_inference_steps=steps,
        output_type="latent",
    )


PIPELINES = {"ddpm": lambda: unconditional(DDPMPipeline), "ddim": lambda: unconditional(DDIMPipeline), "dit": dit, "pixart": pixart}
CASES = [("ddpm", False), ("ddim", False), ("dit", True), ("dit", False), ("pixart", True), ("pixart", False)]


def capture_layer(pipe):
    if isinstance(pipe, (DDPMPipeline, DDIMPipeline)):
        return pipe.unet, pipe.unet.mid_block.attentions[0]
    model = pipe.transformer
    return model, model.transformer_blocks[len(model.transformer_blocks) // 2].attn1


def images(out):
    return torch.as_tensor(out.images if hasattr(out, "images") else out[0])


class Recorder:
    """Every call of the model (input, conditioning, output) and the capture layer's input."""

    def __init__(self, model, attn):
        self.calls, self.hidden = [], []
        self.handles = [
            model.register_forward_pre_hook(self.pre, with_kwargs=True),
            model.register_forward_hook(self.post, with_kwargs=True),
            attn.register_forward_pre_hook(
                lambda m, a, k: self.hidden.append((a[0] if a else k["hidden_states"]).detach().clone()), with_kwargs=True
            ),
        ]

    def pre(self, module, args, kwargs):
        self.calls.append({"x": args[0].detach().clone(), "kwargs": kwargs})

    def post(self, module, args, kwargs, output):
        self.calls[-1]["out"] = (output[0] if isinstance(output, tuple) else output.sample).detach().clone()

    def remove(self):
        for h in self.handles:
            h.remove()


def dense_mass(attn, hidden):
    """Attention each key receives, averaged over heads, from a dense softmax (the spec)."""
    if hidden.dim() == 4:
        b, c, h, w = hidden.shape
        hidden = hidden.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden = attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2)
    q, k = attn.to_q(hidden), attn.to_k(hidden)
    b, n, inner = q.shape
    heads = attn.heads
    q = q.view(b, n, heads, inner // heads).transpose(1, 2)
    k = k.view(b, n, heads, inner // heads).transpose(1, 2)
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * attn.scale, dim=-1)
    return p.sum(2).mean(1)


def expected_degraded(attn, hidden, x, out, abar, guide, map_hw):
    """Spec steps 2-5 on the guide rows: x0/eps (epsilon prediction), mask, blur, blend, re-noise."""
    c = x.shape[1]
    mass = dense_mass(attn, hidden[guide])
    mask = (mass > 1.0).float().reshape(-1, 1, *map_hw)
    mask = F.interpolate(mask, x.shape[-2:])
    eps = out[guide, :c].double()
    xg = x[guide].double()
    x0 = (xg - (1 - abar) ** 0.5 * eps) / abar**0.5
    x0d = gaussian_blur_2d(x0, 9, 1.0) * mask + x0 * (1 - mask)
    return abar**0.5 * x0d + (1 - abar) ** 0.5 * eps, mask.bool().expand_as(x0)


@pytest.mark.parametrize("name, cfg_on", CASES, ids=[f"{n}-{'cfg' if c else 'nocfg'}" for n, c in CASES])
def test_family_exact_sag_follows_the_spec(name, cfg_on):
    pipe = PIPELINES[name]()
    plain = images(pipe(**call_kwargs(name, cfg_on)))
    sagfast.enable(pipe, scale=0.0)
    assert torch.equal(images(pipe(**call_kwargs(name, cfg_on))), plain), "scale=0 must be exactly the plain pipeline"
    sagfast.enable(pipe, scale=1.0)
    model, attn = capture_layer(pipe)
    rec = Recorder(model, attn)
    try:
        guided = images(pipe(**call_kwargs(name, cfg_on)))
    finally:
        rec.remove()
    effect = (guided - plain).abs().max().item()
    assert effect > 1e-3, "SAG did not change the output"
    main_calls, degraded_calls = rec.calls[0::2], rec.calls[1::2]
    full = main_calls[0]["x"].shape[0]
    b = full // 2 if cfg_on else full
    assert [c["x"].shape[0] for c in rec.calls] == [full, b] * len(main_calls)
    guide = slice(b, 2 * b) if (cfg_on and name == "dit") else slice(0, b)  # DiT batches [cond, uncond]
    patch = 1 if name in ("ddpm", "ddim") else model.config.patch_size
    checked = 0
    for i, (main, degraded) in enumerate(zip(main_calls, degraded_calls)):
        x = main["x"]
        map_hw = (x.shape[-2] // 2, x.shape[-1] // 2) if patch == 1 else (x.shape[-2] // patch, x.shape[-1] // patch)
        t = main["kwargs"].get("timestep", None)
        t = t.reshape(-1)[0] if t is not None else pipe.scheduler.timesteps[i]
        abar = pipe.scheduler.alphas_cumprod[int(t)].double()
        with torch.no_grad():
            want, mask = expected_degraded(attn, rec.hidden[2 * i], x, main["out"], abar, guide, map_hw)
        got = degraded["x"].double()
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
        assert torch.allclose(got[~mask], x[guide].double()[~mask], atol=1e-5)  # outside the mask: the input
        checked += 1
    assert checked == 3


@pytest.mark.parametrize("name, cfg_on", CASES, ids=[f"{n}-{'cfg' if c else 'nocfg'}" for n, c in CASES])
def test_family_batched_one_call_per_step_and_exact_input_at_equal_eps(name, cfg_on):
    pipe = sagfast.enable(PIPELINES[name](), mode="batched")
    model, attn = capture_layer(pipe)
    rec = Recorder(model, attn)
    try:
        images(pipe(**call_kwargs(name, cfg_on)))
    finally:
        rec.remove()
    sizes = [c["x"].shape[0] for c in rec.calls]
    full = sizes[0]
    b = full // 2 if cfg_on else full
    assert sizes == [full, b, full + b, full + b]  # the first step exact, then one call of full + B
    # Two evaluations at the same x and t: the second has eps_prev = its own eps.
    x, kwargs = rec.calls[0]["x"], {k: v for k, v in rec.calls[0]["kwargs"].items() if k != "return_dict"}
    pipe._guidance_scale = 4.5 if cfg_on else 1.0
    arguments = {"guidance_scale": 4.5 if cfg_on else 1.0}
    rec = Recorder(model, attn)
    try:
        with guided_call(pipe, config_of(pipe), arguments) as call, torch.no_grad():
            call.denoiser(x, **kwargs)
            call.denoiser(x, **kwargs)
    finally:
        rec.remove()
    exact, batched = rec.calls[1]["x"], rec.calls[2]["x"][full:]
    assert (batched - exact).abs().max().item() <= 1e-5 * max(1.0, exact.abs().max().item())


def test_a_transformer_without_self_attention_at_the_block_is_refused_untouched():
    pipe = dit()
    processors = lambda: {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}  # noqa: E731
    before = processors()
    with pytest.raises(ValueError, match=r"no.*there\. Self-attention layers it has: .*transformer_blocks\.0\.attn1"):
        sagfast.enable(pipe, layers="transformer_blocks.7")
    assert not sagfast.is_enabled(pipe) and processors() == before
    sagfast.enable(pipe, layers="transformer_blocks.0")  # a block name takes its self-attention
    assert processors() != before
    sagfast.disable(pipe)
    assert processors() == before


def test_an_unknown_pipeline_names_the_families():
    from diffusers import StableDiffusionPAGPipeline

    with pytest.raises(ValueError, match="Pipelines it guides.*DDPMPipeline.*DiTPipeline.*PixArtAlphaPipeline"):
        sagfast.enable(object.__new__(StableDiffusionPAGPipeline))
