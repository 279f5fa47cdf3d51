"""SAG on the flow-matching families: Stable Diffusion 3 (joint attention, [image, text], CFG batch) and
Flux (packed latents, RoPE, [text, image], guidance distilled: no CFG batch), on tiny random
components built from configs (no text encoders: the embeddings are passed in).

For each: enable runs, scale=0 is exactly the plain pipeline, SAG changes the output, and every
degraded input equals the spec computed here independently of sagfast: a dense softmax of the capture
layer's q and k over ALL keys (image and text) with the mass taken on image queries and image keys,
diffusers' own blur, nearest upsampling, and the flow parametrization a = 1 - sigma, b = sigma with
x0 = x - sigma * v, eps = x + (1 - sigma) * v. Outside the mask the degraded input is the model input.
Batched mode makes one model call per step after the first, builds the exact degraded input when
eps_prev is the current eps, and stays finite at sigma = 1 (a = 0).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from components import tiny_vae
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import gaussian_blur_2d

import sagfast
import sagfast.engine.denoiser
from sagfast.api import config_of, guided_call
from sagfast.attention.capture import RotaryCaptureSwitch
from sagfast.attention.processors import FluxCaptureProcessor, JointCaptureProcessor
from sagfast.core.schedule import x0_eps

TXT, JOINT, POOLED = 5, 12, 10


def sd3(scheduler=None):
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=JOINT,
        caption_projection_dim=16,
        pooled_projection_dim=POOLED,
        pos_embed_max_size=16,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux(scheduler=None):
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=3,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=JOINT,
        pooled_projection_dim=POOLED,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    scheduler = scheduler or FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, TXT, JOINT, generator=g), torch.randn(n, POOLED, generator=g)


# SD3: latent 12 x 10, map 6 x 5 (patch 2). Flux: latent 10 x 8, packed token grid 5 x 4.
SIZE = {"sd3": (24, 20), "flux": (20, 16)}


def call_kwargs(name, cfg_on=True, steps=3):
    pe, pooled = embeds(seed=1)
    height, width = SIZE[name]
    common = dict(height=height, width=width, num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0))
    if name == "sd3":
        ne, npooled = embeds(seed=2)
        return dict(
            prompt_embeds=pe,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=ne,
            negative_pooled_prompt_embeds=npooled,
            guidance_scale=5.0 if cfg_on else 1.0,
            **common,
        )
    return dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, guidance_scale=3.5, **common)


PIPELINES = {"sd3": sd3, "flux": flux}
CASES = [("sd3", True), ("sd3", False), ("flux", False)]
IDS = ["sd3-cfg", "sd3-nocfg", "flux"]


def capture_layer(pipe):
    model = pipe.components["transformer"]  # the user's model, also inside a guided call
    return model, model.transformer_blocks[len(model.transformer_blocks) // 2].attn


def attention_processors(pipe):
    return {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}


class Recorder:
    """Every call of the model (input, conditioning, output) and the capture layer's inputs."""

    def __init__(self, model, attn):
        self.calls, self.attn = [], []
        self.handles = [
            model.register_forward_pre_hook(self.pre, with_kwargs=True),
            model.register_forward_hook(self.post, with_kwargs=True),
            attn.register_forward_pre_hook(self.layer, with_kwargs=True),
        ]

    def pre(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.calls.append({"x": x.detach().clone(), "kwargs": kwargs})

    def post(self, module, args, kwargs, output):
        self.calls[-1]["out"] = (output[0] if isinstance(output, tuple) else output.sample).detach().clone()

    def layer(self, module, args, kwargs):
        self.attn.append({k: v for k, v in kwargs.items()})

    def remove(self):
        for h in self.handles:
            h.remove()


def record(pipe, fn):
    rec = Recorder(*capture_layer(pipe))
    try:
        return fn(), rec
    finally:
        rec.remove()


def heads(t, n):
    b, length, inner = t.shape
    return t.view(b, length, n, inner // n).transpose(1, 2)


def dense_image_mass(name, attn, inputs, rows):
    """Mass of image keys from image queries, averaged over heads, each query's softmax over ALL keys
    (image and text), from the dense attention map: the spec."""
    hs, ehs = inputs["hidden_states"][rows], inputs["encoder_hidden_states"][rows]
    if name == "sd3":  # [image, text]
        q, k = heads(attn.to_q(hs), attn.heads), heads(attn.to_k(hs), attn.heads)
        eq, ek = heads(attn.add_q_proj(ehs), attn.heads), heads(attn.add_k_proj(ehs), attn.heads)
        if attn.norm_q is not None:
            q, k, eq, ek = attn.norm_q(q), attn.norm_k(k), attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k = torch.cat([q, eq], 2), torch.cat([k, ek], 2)
        image = slice(0, hs.shape[1])
    else:  # Flux: [text, image], RoPE on the joint sequence
        d = attn.head_dim
        q, k = attn.norm_q(attn.to_q(hs).unflatten(-1, (-1, d))), attn.norm_k(attn.to_k(hs).unflatten(-1, (-1, d)))
        eq, ek = (
            attn.norm_added_q(attn.add_q_proj(ehs).unflatten(-1, (-1, d))),
            attn.norm_added_k(attn.add_k_proj(ehs).unflatten(-1, (-1, d))),
        )
        rope = inputs["image_rotary_emb"]
        q = apply_rotary_emb(torch.cat([eq, q], 1), rope, sequence_dim=1).transpose(1, 2)
        k = apply_rotary_emb(torch.cat([ek, k], 1), rope, sequence_dim=1).transpose(1, 2)
        image = slice(ehs.shape[1], ehs.shape[1] + hs.shape[1])
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return p[:, :, image, image].sum(2).mean(1)


def to_image(name, pipe, x):
    if name == "sd3":
        return x
    height, width = SIZE["flux"]
    return FluxPipeline._unpack_latents(x, height, width, pipe.vae_scale_factor)  # diffusers' own unpacking


def expected_degraded(name, pipe, attn, inputs, x, v, sigma, guide):
    """Spec steps 2-5 on the guide rows, flow matching: x0 = x - sigma v, eps = x + (1 - sigma) v; mask
    on the map, nearest upsampling, diffusers' blur, blend, re-noise with a = 1 - sigma, b = sigma."""
    xg, vg = to_image(name, pipe, x)[guide].double(), to_image(name, pipe, v)[guide].double()
    patch = 2  # SD3's patch size; Flux's 2x2 packing
    map_hw = (xg.shape[-2] // patch, xg.shape[-1] // patch)
    mass = dense_image_mass(name, attn, inputs, guide)
    mask = (mass > 1.0).double().reshape(-1, 1, *map_hw)
    mask = F.interpolate(mask, xg.shape[-2:])  # nearest
    x0, eps = xg - sigma * vg, xg + (1 - sigma) * vg
    x0d = gaussian_blur_2d(x0, 9, 1.0) * mask + x0 * (1 - mask)
    return (1 - sigma) * x0d + sigma * eps, mask.bool().expand_as(x0), x0


@pytest.mark.parametrize("name, cfg_on", CASES, ids=IDS)
def test_exact_sag_follows_the_flow_spec(name, cfg_on, monkeypatch):
    pipe = PIPELINES[name]()
    plain = pipe(**call_kwargs(name, cfg_on)).images
    sagfast.enable(pipe, scale=0.0)
    assert torch.equal(pipe(**call_kwargs(name, cfg_on)).images, plain), "scale=0 must be exactly the plain pipeline"
    sagfast.enable(pipe, scale=1.0)
    noises = []  # the (a, b) sagfast reads per step, observed, not changed

    def noise_of(*args, **kwargs):
        noises.append(real_noise_of(*args, **kwargs))
        return noises[-1]

    real_noise_of = sagfast.engine.denoiser.noise_of
    monkeypatch.setattr(sagfast.engine.denoiser, "noise_of", noise_of)
    guided, rec = record(pipe, lambda: pipe(**call_kwargs(name, cfg_on)).images)
    effect = (guided - plain).abs().max().item()
    print(f"\n{name} cfg={cfg_on}: max |SAG - plain| = {effect:.4g}")
    assert torch.isfinite(guided).all() and effect > 1e-3, "SAG did not change the output"

    model, attn = capture_layer(pipe)
    main_calls, degraded_calls = rec.calls[0::2], rec.calls[1::2]
    full = main_calls[0]["x"].shape[0]
    b = full // 2 if cfg_on else full
    assert [c["x"].shape[0] for c in rec.calls] == [full, b] * 3
    guide = slice(0, b)  # SD3 batches [uncond, cond]; Flux has one branch
    sigmas = pipe.scheduler.sigmas.double()
    worst, partial = 0.0, False
    for i, (main, degraded) in enumerate(zip(main_calls, degraded_calls)):
        sigma = sigmas[i].item()
        assert torch.allclose(noises[i].a, torch.full_like(noises[i].a, 1 - sigma)) and torch.allclose(
            noises[i].b, torch.full_like(noises[i].b, sigma)
        )
        x, v = main["x"], main["out"]
        with torch.no_grad():
            want, mask, x0 = expected_degraded(name, pipe, attn, rec.attn[2 * i], x, v, sigma, guide)
        # x0 as sagfast recovers it from the guide output, with the (a, b) it read: x - sigma * v.
        got_x0, _ = x0_eps(to_image(name, pipe, x)[guide], to_image(name, pipe, v)[guide], noises[i], "flow")
        assert (got_x0.double() - x0).abs().max().item() <= 1e-5 * max(1.0, x0.abs().max().item())
        got = to_image(name, pipe, degraded["x"]).double()
        diff = (got - want).abs().max().item()
        worst = max(worst, diff)
        assert diff <= 1e-5 * max(1.0, want.abs().max().item())
        xg = to_image(name, pipe, x)[guide].double()
        assert torch.allclose(got[~mask], xg[~mask], atol=1e-5)  # outside the mask: the model input
        partial |= bool(mask.any()) and not bool(mask.all())
        # The degraded pass gets the guide rows of every batched conditioning input.
        for key in ("encoder_hidden_states", "pooled_projections", "guidance"):
            if main["kwargs"].get(key) is not None:
                assert torch.equal(degraded["kwargs"][key], main["kwargs"][key][guide]), key
    print(f"{name} cfg={cfg_on}: degraded input max |sagfast - spec| = {worst:.3g}")
    assert partial, "the test never saw a mask that blurs part of the latent"


def by_hand_inputs(name, pipe, chunks, step):
    """Model inputs for one step, built as the pipeline builds them, and the scheduler set to `step`."""
    g = torch.Generator().manual_seed(4)
    pe, pooled = embeds(2, seed=5)
    if name == "sd3":
        pipe.scheduler.set_timesteps(4)
        t = pipe.scheduler.timesteps[step]
        if chunks == 2:
            ne, npooled = embeds(2, seed=6)
            pe, pooled = torch.cat([ne, pe]), torch.cat([npooled, pooled])
        x = torch.randn(2 * chunks, 4, 12, 10, generator=g)
        return dict(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=pe, pooled_projections=pooled)
    pipe.scheduler.set_timesteps(4, mu=0.8)
    pipe.scheduler.set_begin_index(step)  # as FluxPipeline does (0) before its loop
    t = pipe.scheduler.timesteps[step]
    x = torch.randn(2, 20, 16, generator=g)
    return dict(
        hidden_states=x,
        timestep=t.expand(2) / 1000,
        encoder_hidden_states=pe,
        pooled_projections=pooled,
        img_ids=FluxPipeline._prepare_latent_image_ids(2, 5, 4, x.device, x.dtype),
        txt_ids=torch.zeros(TXT, 3),
        guidance=torch.full([2], 3.5),
    )


@pytest.mark.parametrize("name, cfg_on", CASES, ids=IDS)
def test_batched_one_call_per_step_and_exact_input_at_equal_eps(name, cfg_on):
    pipe = sagfast.enable(PIPELINES[name](), mode="batched")
    out, rec = record(pipe, lambda: pipe(**call_kwargs(name, cfg_on)).images)
    assert torch.isfinite(out).all()  # the first step runs at sigma = 1 (a = 0)
    sizes = [c["x"].shape[0] for c in rec.calls]
    full = sizes[0]
    b = full // 2 if cfg_on else full
    assert sizes == [full, b, full + b, full + b]  # the first step exact, then one call of full + B
    chunks = 2 if cfg_on else 1
    pipe._guidance_scale = 5.0 if cfg_on else 1.0  # what the pipeline sets at the start of a call
    # Two evaluations at the same x and t: the second (batched) has eps_prev = its own eps.
    kwargs = by_hand_inputs(name, pipe, chunks, step=1)
    full = kwargs["hidden_states"].shape[0]
    with guided_call(pipe, config_of(pipe)) as call, torch.no_grad():
        _, rec = record(pipe, lambda: [call.denoiser(**kwargs), call.denoiser(**kwargs)])
    assert [c["x"].shape[0] for c in rec.calls] == [full, 2, full + 2]
    exact, batched = rec.calls[1]["x"], rec.calls[2]["x"][full:]
    diff = (batched - exact).abs().max().item()
    print(f"\n{name} cfg={cfg_on}: batched vs exact degraded input at equal eps: {diff:.3g}")
    assert diff <= 1e-5 * max(1.0, exact.abs().max().item())
    assert not torch.equal(exact, kwargs["hidden_states"][:2]), "the degraded input should differ from the input here"


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_batched_at_sigma_one_is_finite_and_degrades_nothing(name):
    """At sigma = 1, a = 0: x0 = x - v is pure prediction and the degraded input a * Degrade(x0) + b * eps
    is eps = x; batched mode must not divide by a = 0."""
    pipe = sagfast.enable(PIPELINES[name](), mode="batched")
    pipe._guidance_scale = 1.0  # what the pipeline sets at the start of a call (SD3: CFG off)
    kwargs = by_hand_inputs(name, pipe, 1, step=0)
    assert pipe.scheduler.sigmas[0].item() == 1.0
    with guided_call(pipe, config_of(pipe)) as call, torch.no_grad():
        outs, rec = record(pipe, lambda: [call.denoiser(**kwargs).sample, call.denoiser(**kwargs).sample])
    assert [c["x"].shape[0] for c in rec.calls] == [2, 2, 4]
    x = kwargs["hidden_states"]
    assert all(torch.isfinite(o).all() for o in outs)
    assert torch.isfinite(rec.calls[2]["out"]).all()
    assert torch.allclose(rec.calls[1]["x"], x, atol=1e-6) and torch.equal(rec.calls[2]["x"][2:], x)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_scheduler_with_an_unknown_prediction_type_is_refused_untouched(name):
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="epsilon")
    pipe = PIPELINES[name](scheduler=scheduler)
    cls, before = type(pipe), attention_processors(pipe)
    with pytest.raises(ValueError, match=r"flow-matching schedule with prediction_type='epsilon'"):
        sagfast.enable(pipe)
    assert type(pipe) is cls and not sagfast.is_enabled(pipe) and attention_processors(pipe) == before


def test_sd3_capture_processor_reproduces_the_joint_processor_and_its_mass():
    model = sd3().transformer
    g = torch.Generator().manual_seed(7)
    hs, ehs = torch.randn(3, 30, 16, generator=g), torch.randn(3, TXT, 16, generator=g)
    for attn in (model.transformer_blocks[1].attn, model.transformer_blocks[-1].attn):  # the last block is context_pre_only
        with torch.no_grad():
            want = JointAttnProcessor2_0()(attn, hs, ehs)
            ours = JointCaptureProcessor(slice(1, 3), backend="torch")
            got = ours(attn, hs, ehs)
            mass = dense_image_mass("sd3", attn, {"hidden_states": hs, "encoder_hidden_states": ehs}, slice(1, 3))
        for w, o in zip(want, got):
            assert (w - o).abs().max().item() <= 1e-6
        assert ours.mass.shape == (2, 30) and (ours.mass.double() - mass).abs().max().item() <= 1e-5
        assert 0.0 < mass.mean().item() < 1.0  # text keys take their share of the softmax


def test_flux_capture_processor_reproduces_the_flux_processor_and_its_mass():
    model = flux().transformer
    attn = model.transformer_blocks[1].attn
    g = torch.Generator().manual_seed(7)
    hs, ehs = torch.randn(2, 20, 16, generator=g), torch.randn(2, TXT, 16, generator=g)
    ids = torch.cat([torch.zeros(TXT, 3), FluxPipeline._prepare_latent_image_ids(1, 5, 4, "cpu", torch.float32)])
    rope = model.pos_embed(ids)
    with torch.no_grad():
        want = FluxAttnProcessor()(attn, hs, ehs, None, rope)
        ours = FluxCaptureProcessor(slice(0, 2), backend="torch")
        got = ours(attn, hs, ehs, None, rope)
        mass = dense_image_mass("flux", attn, {"hidden_states": hs, "encoder_hidden_states": ehs, "image_rotary_emb": rope}, slice(0, 2))
    for w, o in zip(want, got):
        assert (w - o).abs().max().item() <= 1e-6
    assert (ours.mass.double() - mass).abs().max().item() <= 1e-5


def test_flux_switch_passes_the_rotary_embedding_on():
    pipe = sagfast.enable(flux())
    _, attn = capture_layer(pipe)
    assert isinstance(attn.processor, RotaryCaptureSwitch) and isinstance(attn.processor.inner, FluxAttnProcessor)
    sagfast.disable(pipe)
    assert isinstance(attn.processor, FluxAttnProcessor)


def test_unknown_layers_are_refused_with_the_layers_there_are():
    pipe = sd3()
    before = attention_processors(pipe)
    with pytest.raises(ValueError, match=r"transformer_blocks\.7.*Self-attention layers it has: .*transformer_blocks\.0\.attn"):
        sagfast.enable(pipe, layers="transformer_blocks.7")
    assert not sagfast.is_enabled(pipe) and attention_processors(pipe) == before
    sagfast.enable(pipe, layers="transformer_blocks.0")  # a block name takes its joint attention
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.processor, sagfast.attention.capture.CaptureSwitch)

    pipe = flux()
    before = attention_processors(pipe)
    with pytest.raises(ValueError, match=r"single-stream blocks are not offered.*transformer_blocks\.0\.attn"):
        sagfast.enable(pipe, layers="single_transformer_blocks.0")
    assert not sagfast.is_enabled(pipe) and attention_processors(pipe) == before


@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_flux_true_cfg_gives_true_cfg_plus_sag_of_the_negative_branch(mode):
    # True CFG is two calls per step, cond then negative, combined by the pipeline as
    # neg + w * (pos - neg). sagfast joins them; whatever it hands each call, the prediction the
    # scheduler receives must be neg + w * (pos - neg) + s * (neg - o_deg), from the joined call's rows.
    from recording import check_joined_cfg

    pipe = sagfast.enable(flux(), scale=0.75, mode=mode)
    ne, npooled = embeds(2, seed=2)

    def run():
        pipe(**call_kwargs("flux"), negative_prompt_embeds=ne, negative_pooled_prompt_embeds=npooled, true_cfg_scale=4.0)

    check_joined_cfg(pipe, run, images=2, w=4.0, s=0.75, mode=mode, steps=3)


@pytest.mark.parametrize("rule", ["apg", "cfg_zero_star"])
def test_flux_true_cfg_with_sagfasts_cfg_rules_takes_the_true_cfg_scale(rule):
    # With the two calls joined, sagfast's CFG rule combines them with the scale the pipeline would
    # (true_cfg_scale), not Flux's distilled guidance_scale: the same as naming that scale.
    ne, npooled = embeds(2, seed=2)
    true_cfg = dict(negative_prompt_embeds=ne, negative_pooled_prompt_embeds=npooled)
    pipe = sagfast.enable(flux(), scale=0.75, cfg_rule=rule)
    got = pipe(**call_kwargs("flux"), **true_cfg, true_cfg_scale=4.0).images
    named = sagfast.enable(flux(), scale=0.75, cfg_rule=rule, cfg_scale=4.0)(**call_kwargs("flux"), **true_cfg, true_cfg_scale=4.0).images
    other = sagfast.enable(flux(), scale=0.75, cfg_rule=rule)(**call_kwargs("flux"), **true_cfg, true_cfg_scale=8.0).images
    assert (got - named).abs().max().item() <= 1e-5 * max(1.0, named.abs().max().item())
    assert (got - other).abs().max().item() > 1e-2


def test_joining_calls_whose_inputs_cannot_join_is_refused_clearly():
    from sagfast.core.batch import join_calls

    cond = {"encoder_hidden_states": torch.zeros(1, 5, 4), "txt_ids": torch.zeros(5, 3)}
    joined = join_calls(dict(cond, encoder_hidden_states=torch.ones(1, 5, 4)), cond, 1)
    assert joined["encoder_hidden_states"].shape == (2, 5, 4) and joined["encoder_hidden_states"][0].eq(1).all()
    with pytest.raises(ValueError, match=r"`encoder_hidden_states` differ .*\(1, 4, 4\) and \(1, 5, 4\).*the prompt's length"):
        join_calls(dict(cond, encoder_hidden_states=torch.zeros(1, 4, 4)), cond, 1)
    with pytest.raises(ValueError, match="`txt_ids` differ"):
        join_calls(dict(cond, txt_ids=torch.ones(5, 3)), cond, 1)


def test_a_kept_call_is_a_copy_of_what_the_pipeline_may_edit_in_place():
    # FluxPipeline puts each branch's IP-Adapter embeddings into one joint_attention_kwargs dict before
    # each of its two calls, and its transformer pops them: the joined-call state keeps copies.
    from sagfast.core.batch import same_inputs, snapshot

    kwargs = {"ip_adapter_image_embeds": [torch.zeros(1, 4)]}
    call = {"hidden_states": torch.zeros(1, 2), "joint_attention_kwargs": kwargs}
    kept = snapshot(call)
    kwargs["ip_adapter_image_embeds"] = [torch.ones(1, 4)]  # the pipeline, before its uncond call
    assert kept["joint_attention_kwargs"]["ip_adapter_image_embeds"][0].eq(0).all()
    assert kept["hidden_states"] is call["hidden_states"]  # tensors are not copied
    assert not same_inputs(call, kept)  # so the uncond call's embeddings are seen to differ
    assert same_inputs({"a": [1, None]}, {"a": [1, None]}) and not same_inputs({"a": float("nan")}, {"a": float("nan")})


def test_sd3_skip_layer_guidance_is_refused():
    pipe = sagfast.enable(sd3())
    with pytest.raises(ValueError, match="skip_guidance_layers"):
        pipe(**call_kwargs("sd3"), skip_guidance_layers=[1])


def test_flux_graph_key_tells_token_grids_of_one_length_apart(monkeypatch):
    """A CUDA graph bakes the token grid into its unpacking: 5x4 and 4x5 grids pack to one shape, so the
    grid is part of the graph's key (keys computed here as `_graphed` computes them, on the CPU)."""
    from sagfast.engine.cuda_graph import StepGraphs
    from sagfast.engine.denoiser import GuidedCall

    keys = []
    run_step = GuidedCall.run_step

    def recording(self, variant, step):
        keys.append(StepGraphs.key(self.graph_variant(variant, step), self.graph_inputs(step)[0]))
        return run_step(self, variant, step)

    monkeypatch.setattr(GuidedCall, "run_step", recording)
    pipe = sagfast.enable(flux())
    for height, width in ((20, 16), (16, 20)):
        pipe(**{**call_kwargs("flux", steps=2), "height": height, "width": width})
    assert len(keys) == 4 and keys[0] == keys[1] and keys[2] == keys[3] and keys[0] != keys[2]
