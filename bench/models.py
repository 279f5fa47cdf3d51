"""Models for the benchmarks: diffusers components built from configs, random weights, no hub access.

- "tiny":  UNet block_out_channels (32, 64), cross-attention dim 32 (the test suite's tiny model).
- "sd15":  the SD 1.5 UNet's shape: block_out_channels (320, 640, 1280, 1280), attention_head_dim 8,
           cross_attention_dim 768, 77 text tokens (~860M parameters).
- "tiny_xl": the tiny UNet with SDXL's conditioning (text_time added embeddings, pooled text, two
           transformer layers in its attention level): what diffusers' modular SDXL pipeline takes.
- "sdxl":  the SDXL base UNet's shape: block_out_channels (320, 640, 1280), transformer depths
           (1, 2, 10), head dims (5, 10, 20), cross_attention_dim 2048, text_time conditioning (~2.6B).

Weights are random (seeded), so the images are noise; the compute per step is the real model's.
Text encoders are left out: pipelines get `prompt_embeds` directly. For step timing the VAE is never
run (output_type="latent"), so a VAE with the right downsampling factor (8) and tiny channels stands in;
`vae="sd"` builds the real SD VAE shape for end-to-end timing with decode.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    unet: dict
    cross_dim: int
    tokens: int
    default_size: int  # image side in pixels (latent side * 8)
    xl: bool = False
    pooled_dim: int = 0


TINY = ModelSpec(
    name="tiny",
    unet=dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=[2, 4],
        norm_num_groups=8,
    ),
    cross_dim=32,
    tokens=8,
    default_size=128,
)

TINY_XL = ModelSpec(
    name="tiny_xl",
    unet=dict(
        TINY.unet,
        cross_attention_dim=64,
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8, and the pooled text (32)
    ),
    cross_dim=64,
    tokens=8,
    default_size=128,
    xl=True,
    pooled_dim=32,
)

SD15 = ModelSpec(
    name="sd15",
    unet=dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    cross_dim=768,
    tokens=77,
    default_size=512,
)

SDXL = ModelSpec(
    name="sdxl",
    unet=dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    cross_dim=2048,
    tokens=77,
    default_size=1024,
    xl=True,
    pooled_dim=1280,
)

MODELS = {m.name: m for m in (TINY, TINY_XL, SD15, SDXL)}


def _to(module, device, dtype):
    if dtype != torch.float32:  # (a float32 .to(dtype) only makes diffusers warn)
        module = module.to(dtype=dtype)
    return module.to(device=device).eval().requires_grad_(False)


def build_unet(spec: ModelSpec, device, dtype, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**spec.unet)
    return _to(unet, device, dtype)


def build_vae(kind: str, device, dtype, seed: int = 0) -> AutoencoderKL:
    """kind "stub": 8x downsampling with 8 channels per level (never run in step timing);
    kind "sd": the SD VAE's shape (block_out_channels 128, 256, 512, 512)."""
    torch.manual_seed(seed)
    if kind == "stub":
        cfg = dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)
    elif kind == "sd":
        cfg = dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2)
    else:
        raise ValueError(f"unknown vae kind {kind!r}")
    with torch.device(device):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            sample_size=512,
            **cfg,
        )
    return _to(vae, device, dtype)


def scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    # DDIM: an integer-timestep scheduler, the kind diffusers' SAG pipeline accepts.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )


def components(spec: ModelSpec, device, dtype, vae: str = "stub", unet=None) -> dict:
    """Keyword arguments for a StableDiffusion(XL)Pipeline: shared `unet` if given, fresh otherwise."""
    unet = unet if unet is not None else build_unet(spec, device, dtype)
    comps = dict(vae=build_vae(vae, device, dtype), unet=unet, scheduler=scheduler())
    if spec.xl:
        comps.update(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    else:
        comps.update(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return comps


def prompt_kwargs(spec: ModelSpec, device, dtype, batch: int = 1, seed: int = 1) -> dict:
    """Random prompt / negative-prompt embeddings (and SDXL pooled embeddings) for `batch` images."""
    g = torch.Generator().manual_seed(seed)
    emb = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    kw = dict(
        prompt_embeds=emb(batch, spec.tokens, spec.cross_dim),
        negative_prompt_embeds=emb(batch, spec.tokens, spec.cross_dim),
    )
    if spec.xl:
        kw.update(
            pooled_prompt_embeds=emb(batch, spec.pooled_dim),
            negative_pooled_prompt_embeds=emb(batch, spec.pooled_dim),
        )
    return kw


def sd_pipeline_classes(spec: ModelSpec) -> dict:
    """{"base", "pag", "sag"} pipeline classes for the model family (None where diffusers has none)."""
    if spec.xl:
        from diffusers import StableDiffusionXLPAGPipeline, StableDiffusionXLPipeline

        return {"base": StableDiffusionXLPipeline, "pag": StableDiffusionXLPAGPipeline, "sag": None}
    from diffusers import StableDiffusionPAGPipeline, StableDiffusionPipeline
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        StableDiffusionSAGPipeline,
    )

    return {"base": StableDiffusionPipeline, "pag": StableDiffusionPAGPipeline, "sag": StableDiffusionSAGPipeline}


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def default_names(opts, cuda: bool) -> list:
    """The models a scenario runs: --models, else tiny (--quick), else tiny + sd15 (+ sdxl on CUDA or --full)."""
    if opts.models:
        return opts.models
    if opts.quick:
        return ["tiny"]
    if cuda or opts.full:
        return ["tiny", "sd15", "sdxl"]
    return ["tiny", "sd15"]
