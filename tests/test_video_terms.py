"""PAG and STG on the video pipelines (CogVideoX, LTX-Video, Wan 2.1), on the tiny random components of
test_video.py. diffusers ships neither for these pipelines, so the reference is the formula computed
here on the plain pipeline: a hook on its transformer runs the cond rows again with the perturbation
written in this file, and hands the pipeline `c + s * (c - o_perturbed) / g` as its cond prediction, so
that the pipeline's own CFG line gives `cfg + s * (c - o_perturbed)`:

- PAG, and STG's "attention" mode (STG-A) on the chosen blocks' attn1: each video token attends only
  to itself (Wan, LTX: the value projection through `to_out`; CogVideoX's joint attention: the dense
  softmax with the video-video block masked to its diagonal, text keys kept, as diffusers'
  PAGJointAttnProcessor2_0 perturbs SD3);
- STG's "block" mode (STG-R): the block returns its inputs, as the community STG pipelines'
  `forward_with_stg`.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from test_video import call, cogvideox, hunyuan, hunyuan_call, ltx, wan, wan_call

import sagfast
from sagfast.attention.capture import BlockSkipHook

BUILD = {"cogvideox": cogvideox, "ltx": ltx, "wan": wan, "hunyuan": hunyuan}
STACK = {"cogvideox": "transformer_blocks", "ltx": "transformer_blocks", "wan": "blocks", "hunyuan": "transformer_blocks"}
G = {"cogvideox": 6.0, "ltx": 6.0, "wan": 5.0, "hunyuan": 1.0}  # HunyuanVideo: guidance distilled, no CFG line
CHUNKS = {"cogvideox": 2, "ltx": 2, "wan": 2, "hunyuan": 1}
"""Rows of the main batch: [uncond, cond], HunyuanVideo's [cond]."""


def arguments(name):
    if name == "wan":
        return dict(wan_call(), guidance_scale=G[name], output_type="latent")
    if name == "hunyuan":
        return hunyuan_call()
    return call(name, guidance=G[name])


class ValueOnly:
    def __call__(self, attn, hidden_states, *args, **kwargs):
        return attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))


class Diagonal:
    # A class: diffusers' Attention hands a processor the keyword arguments its __call__ names.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return cogvideox_diagonal(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def cogvideox_diagonal(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
    """CogVideoX's attn1 (text then video tokens, one softmax) with the video-video block of the
    attention masked to its diagonal: the dense (T + N)^2 mask."""
    n_text, n = encoder_hidden_states.shape[1], hidden_states.shape[1]
    joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    q, k, v = (p(joint).unflatten(2, (attn.heads, -1)).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    q = torch.cat([q[:, :, :n_text], apply_rotary_emb(q[:, :, n_text:], image_rotary_emb)], dim=2)
    k = torch.cat([k[:, :, :n_text], apply_rotary_emb(k[:, :, n_text:], image_rotary_emb)], dim=2)
    allowed = torch.ones(n_text + n, n_text + n, dtype=torch.bool)
    allowed[n_text:, n_text:] = torch.eye(n, dtype=torch.bool)
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v.double()
    out = attn.to_out[1](attn.to_out[0](out.to(q.dtype).transpose(1, 2).flatten(2)))
    return out[:, n_text:], out[:, :n_text]


class HunyuanDiagonal:
    """HunyuanVideo's joint attention (video then text tokens, RoPE on the video part) with the
    video-video block masked to its diagonal and the padded text keys masked: the dense mask."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        n = hidden_states.shape[1]

        def heads(x, proj, norm):
            return norm(proj(x).unflatten(2, (attn.heads, -1)))

        q, k = heads(hidden_states, attn.to_q, attn.norm_q), heads(hidden_states, attn.to_k, attn.norm_k)
        q, k = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1), apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        q = torch.cat([q, heads(encoder_hidden_states, attn.add_q_proj, attn.norm_added_q)], 1).transpose(1, 2)
        k = torch.cat([k, heads(encoder_hidden_states, attn.add_k_proj, attn.norm_added_k)], 1).transpose(1, 2)
        v = torch.cat([v, attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))], 1).transpose(1, 2)
        total = q.shape[2]
        allowed = attention_mask.reshape(q.shape[0], 1, 1, total).bool().expand(-1, 1, total, -1).clone()
        allowed[:, :, :n, :n] &= torch.eye(n, dtype=torch.bool)
        scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        out = (torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v.double()).to(q.dtype)
        out = out.transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out[:, :n])), attn.to_add_out(out[:, n:])


class Perturbed:
    """The perturbation, on the plain model, for the length of a `with` block."""

    def __init__(self, name, model, term, block):
        self.name, self.term = name, term
        self.block = getattr(model, STACK[name])[block]

    def __enter__(self):
        if self.term == "stg_block":
            outputs = 2 if self.name in ("cogvideox", "hunyuan") else 1

            def skipped(module, hidden_states, encoder_hidden_states=None, *args, **kwargs):
                return (hidden_states, encoder_hidden_states) if outputs == 2 else hidden_states

            self.block.forward = types.MethodType(skipped, self.block)
        else:
            attn = self.block.attn if self.name == "hunyuan" else self.block.attn1
            self.processor = attn.processor
            attn.processor = {"cogvideox": Diagonal, "hunyuan": HunyuanDiagonal}.get(self.name, ValueOnly)()

    def __exit__(self, *exc):
        if self.term == "stg_block":
            del self.block.forward
        else:
            (self.block.attn if self.name == "hunyuan" else self.block.attn1).processor = self.processor


def reference(name, term, s, block):
    """The plain pipeline's latents with `+ s * (c - o_perturbed)` added through its cond prediction."""
    pipe = BUILD[name]()
    model, g = pipe.transformer, G[name]
    args = arguments(name)
    prompt = args["prompt_embeds"]
    busy = []

    def hook(module, a, kwargs, output):
        if busy:
            return None
        out = output[0]
        context = kwargs["encoder_hidden_states"]
        b = prompt.shape[0]
        rows = slice(out.shape[0] - b, out.shape[0])  # the cond rows: last in [uncond, cond]; Wan: its cond call
        if name == "wan" and not torch.equal(context, prompt):
            return None  # Wan's uncond call
        cond = {k: (v[rows] if torch.is_tensor(v) and v.dim() and v.shape[0] == out.shape[0] else v) for k, v in kwargs.items()}
        busy.append(1)
        try:
            with Perturbed(name, model, term, block), torch.no_grad():
                p = module(**cond)[0]
        finally:
            busy.pop()
        fixed = out.clone()
        fixed[rows] = out[rows] + s * (out[rows] - p) / g
        return (fixed, *output[1:])

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        return pipe(**args).frames
    finally:
        handle.remove()


def config_of(name, term, s, block):
    if term == "pag":  # the block's self-attention: attn1, HunyuanVideo's joint attn
        return dict(pag_scale=s, pag_layers=rf"^{STACK[name]}\.{block}\.attn1?$")
    return dict(stg_scale=s, stg_layers=block, stg_mode="block" if term == "stg_block" else "attention")


@pytest.mark.parametrize("term", ["pag", "stg_block", "stg_attention"])
@pytest.mark.parametrize("name", list(BUILD))
def test_pag_and_stg_on_video_follow_the_formula(name, term):
    s, block = 1.5, 1
    want = reference(name, term, s, block)
    pipe = BUILD[name]()
    plain = pipe(**arguments(name)).frames
    processors = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    sagfast.enable(pipe, scale=0.0, **config_of(name, term, s, block))
    sizes = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: sizes.append((a[0] if a else k["hidden_states"]).shape[0]), with_kwargs=True
    )
    got = pipe(**arguments(name)).frames
    handle.remove()
    bound = 1e-4 * max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= bound
    assert (want - plain).abs().max().item() > 100 * bound  # the term moved the latents
    # One call per step of [uncond, cond, perturbed] (HunyuanVideo: [cond, perturbed]); Wan's first step:
    # its cond call, then the joined batch.
    assert sizes == ([1] if name == "wan" else []) + [CHUNKS[name] + 1] * 3
    sagfast.disable(pipe)
    assert torch.equal(pipe(**arguments(name)).frames, plain)
    assert {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")} == processors
    assert not any(isinstance(h, BlockSkipHook) for m in pipe.transformer.modules() for h in m._forward_hooks.values())


@pytest.mark.parametrize("name", list(BUILD))
def test_sag_pag_and_stg_batched_on_video_make_one_call_per_step(name):
    pipe = BUILD[name]()
    plain = pipe(**arguments(name)).frames
    sagfast.enable(pipe, scale=0.75, mode="batched", pag_scale=1.0, pag_layers=r"blocks\.0\.attn1?$", stg_scale=1.0, stg_layers=[2])
    sizes = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: sizes.append((a[0] if a else k["hidden_states"]).shape[0]), with_kwargs=True
    )
    got = pipe(**arguments(name)).frames
    handle.remove()
    assert torch.isfinite(got).all() and (got - plain).abs().max().item() > 1e-2
    # The first step is exact ([uncond, cond, perturbed, skipped], then the degraded rows); every later
    # step is one call of [uncond, cond, perturbed, skipped, degraded].
    k = CHUNKS[name]
    assert sizes == ([1] if name == "wan" else []) + [k + 2, 1] + [k + 3] * 2


@pytest.mark.parametrize(
    "config, message",
    [
        (
            dict(stg_scale=1.0, stg_layers=[7]),
            r"stg_layers entry 7 is not a block of this WanTransformer3DModel: give a block index 0\.\.2",
        ),
        (dict(stg_scale=1.0, stg_layers="blocks.9"), r"'blocks\.0' \.\.\. 'blocks\.2'"),
        (dict(stg_scale=1.0, stg_mode="skip"), r"stg_mode must be one of \('block', 'attention'\), got 'skip'"),
        (dict(stg_scale=1.0, stg_layers=[]), "stg_layers must be a block index"),
        (dict(seg_scale=1.0, seg_layers="blocks.1"), r"sagfast does not run SEG on Wan: .*\(t, h, w\)"),
        (dict(pag_scale=1.0, pag_layers="blocks.7"), r"matches no self-attention layer .*'blocks\.0\.attn1'"),
    ],
)
def test_bad_video_term_settings_are_refused_and_the_pipeline_is_left_as_it_was(config, message):
    pipe = wan()
    processors = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    with pytest.raises(ValueError, match=message):
        sagfast.enable(pipe, scale=0.0, **config)
        pipe(**arguments("wan"))
    assert type(pipe).__name__ == "WanPipeline"
    assert {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")} == processors


def test_stg_on_an_image_family_is_refused_with_what_it_needs():
    from components import prompt_embeds, sd_pipeline

    pipe = sd_pipeline()
    with pytest.raises(ValueError, match="STG skips transformer blocks, and sagfast knows no block stack"):
        sagfast.enable(pipe, scale=0.0, stg_scale=1.0)
        pipe(prompt_embeds=prompt_embeds(1)[0], num_inference_steps=1, output_type="latent")
    assert type(pipe).__name__ == "StableDiffusionPipeline"


def test_the_reference_perturbations_are_not_the_plain_model():
    # The spec above would pass vacuously if its perturbations changed nothing.
    pipe = cogvideox()
    attn = pipe.transformer.transformer_blocks[1].attn1
    hs, text = torch.randn(1, 12, 32), torch.randn(1, 8, 32)
    rope = (torch.randn(12, 16), torch.randn(12, 16))
    with torch.no_grad():
        video, _ = cogvideox_diagonal(attn, hs, text, image_rotary_emb=rope)
        plain, _ = attn(hs, text, image_rotary_emb=rope)
    assert (video - plain).abs().max().item() > 1e-3
    assert F.mse_loss(video, plain).item() > 0


@pytest.mark.parametrize("mode", ["exact", "batched"])
def test_per_video_stg_and_pag_scales_in_one_call_equal_each_video_alone(mode):
    # Two prompts with their own STG and PAG scales share every model call, each video guided as if
    # alone (its own generator: the same noise alone and in the pair).
    settings = dict(scale=0.75, stg_scale=(0.0, 1.5), pag_scale=(1.0, 0.0), pag_layers=r"\.0\.attn1", mode=mode)
    base = call("ltx")
    g = torch.Generator().manual_seed(9)
    texts = {k: torch.cat([v, torch.randn(v.shape, generator=g) if v.is_floating_point() else v]) for k, v in base.items() if "prompt" in k}
    pipe = sagfast.enable(ltx(), **settings)
    pair = pipe(**dict(base, **texts, generator=[torch.Generator().manual_seed(s) for s in (5, 6)])).frames
    for i, seed in enumerate((5, 6)):
        sagfast.enable(pipe, **dict(settings, stg_scale=settings["stg_scale"][i], pag_scale=settings["pag_scale"][i]))
        one = {k: v[i : i + 1] for k, v in texts.items()}
        want = pipe(**dict(base, **one, generator=torch.Generator().manual_seed(seed))).frames[0]
        assert (pair[i] - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item()), i
    assert (pair[0] - pair[1]).abs().max().item() > 1e-2


def test_a_transformer_with_diffusers_cache_on_is_refused_and_left_as_it_was():
    from diffusers import FirstBlockCacheConfig

    pipe = wan()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    with pytest.raises(ValueError, match=r"has diffusers' cache on \(FirstBlockCacheConfig\).*pipe\.transformer\.disable_cache\(\)"):
        sagfast.enable(pipe, scale=0.75)
    assert type(pipe).__name__ == "WanPipeline" and pipe.transformer.is_cache_enabled
    pipe.transformer.disable_cache()
    sagfast.enable(pipe, scale=0.75)
