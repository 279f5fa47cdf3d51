"""A tiny Stable Diffusion pipeline with random weights, built offline from configs.

It has every component `StableDiffusionPipeline.from_pretrained(...)` gives (a CLIP tokenizer and
text encoder, a UNet, a VAE, SD 1.5's PNDM scheduler), only small: a prompt call with every default
the pipeline reads (50 steps, height and width from the UNet's `sample_size`) takes about a second
on a CPU. Its images are noise: it is for trying sagfast's calls without a download, not for
pictures (`sagfast demo` makes real ones, with the digit models that ship in the package).

    python examples/offline_pipeline.py   # builds one and runs a prompt call with SAG
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

HIDDEN = 32


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the byte-level alphabet, each letter also as a word end,
    and the two special tokens, with no merges: every text tokenizes, one token per character. It pads
    to CLIP's 77 tokens, as SD's tokenizer does."""
    letters = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def tiny_text_encoder(vocab_size: int, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    """An SD-shaped UNet (two levels, cross-attention in the lower one); `overrides` change its config."""
    torch.manual_seed(seed)
    config = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=[2, 4],  # a list: diffusers' SAG pipeline reads the heads from its last entry
        norm_num_groups=8,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
    ).eval()


def sd15_scheduler() -> PNDMScheduler:
    """SD 1.5's scheduler config, as `from_pretrained` loads it."""
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )


def tiny_components(seed: int = 0) -> dict:
    """The components of a tiny SD 1.x pipeline (no safety checker), for any pipeline class taking them."""
    tokenizer = tiny_tokenizer()
    return dict(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(len(tokenizer), seed),
        tokenizer=tokenizer,
        unet=tiny_unet(seed),
        scheduler=sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_stable_diffusion(seed: int = 0) -> StableDiffusionPipeline:
    """What `StableDiffusionPipeline.from_pretrained(...)` returns, tiny and offline."""
    pipe = StableDiffusionPipeline(**tiny_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_modular_sdxl(seed: int = 0):
    """What `ModularPipeline.from_pretrained(<an SDXL repo>)` with its components loaded gives, tiny and
    offline: diffusers' modular SDXL blocks on two tiny CLIP text encoders (the second with a
    projection for the pooled embedding) and a tiny SDXL-conditioned UNet."""
    from diffusers import EulerDiscreteScheduler
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks
    from transformers import CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed + 1)
    second = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=HIDDEN,
        )
    ).eval()
    unet = tiny_unet(
        seed,
        cross_attention_dim=2 * HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + HIDDEN,
    )
    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    pipe.update_components(
        text_encoder=tiny_text_encoder(len(tokenizer), seed),
        text_encoder_2=second,
        tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        vae=tiny_vae(seed),
        scheduler=EulerDiscreteScheduler.from_config(sd15_scheduler().config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


if __name__ == "__main__":
    import sagfast

    pipe = sagfast.enable(tiny_stable_diffusion(), scale=0.75)
    image = pipe("a photo of a cat").images[0]
    print(f"a {image.size[0]}x{image.size[1]} image from a guided call with only a prompt")


def tiny_wan_transformer(seed: int = 0, **overrides):
    """A three-block WanTransformer3DModel (patch 1x2x2, 3-D RoPE, 2 heads of 8, text dim 16);
    `overrides` change its config (I2V: more input channels, image embeddings)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=16,
        num_layers=3,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    return WanTransformer3DModel(**{**config, **overrides}).eval()


def tiny_wan_vae(seed: int = 0):
    """A Wan VAE with 4 latent channels (8x spatial, 4x temporal compression), its latent statistics
    sized to them."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()


def wan_scheduler():
    """Wan 2.1's scheduler: UniPC on flow sigmas, shift 3."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def tiny_wan(seed: int = 0):
    """What `WanPipeline.from_pretrained(<a Wan 2.1 repo>)` returns, tiny and offline: a UMT5 text
    encoder (on the tiny tokenizer, padded to Wan's 512 tokens), the tiny transformer and VAE above and
    Wan's flow UniPC."""
    from diffusers import WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=tiny_wan_vae(seed),
        transformer=tiny_wan_transformer(seed),
        scheduler=wan_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
