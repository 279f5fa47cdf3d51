"""Model definitions of the embedded digit model: UNet config, class embedding, classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # index of the "no class" embedding used for the unconditional branch
IMAGE_SIZE = 32  # MNIST's 28x28 padded to 32x32
CROSS_DIM = 64

# A pixel-space class-conditional UNet: 32x32 -> 16x16 -> 8x8; the mid block (UNetMidBlock2DCrossAttn)
# has a self-attention layer over the 8x8 map, which is what SAG reads. Attention (self + cross to the
# class embedding) only at 8x8 and in the mid block: 0.99 M parameters, ~0.22 GFLOP per sample per
# forward, which one shared CPU core trains in ~20 minutes.
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=CROSS_DIM,
    attention_head_dim=4,  # diffusers' name for the number of heads here: 4 heads of 16 channels
    norm_num_groups=8,
)

# The training noise schedule (DDPM's linear betas); any diffusers scheduler built from this config
# (DDIM, DDPM, Euler, DPM-Solver, UniPC, ...) samples the model. v-prediction: with epsilon prediction
# a pixel-space model's x0 estimate at t ~ 999 (abar = 4e-5) amplifies the eps error 150-fold, and
# few-step samplers without clipping drift to saturated images; v keeps x0 = sqrt(abar) x - sqrt(1-abar) v
# well conditioned at every noise level.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="v_prediction",
    clip_sample=False,
    timestep_spacing="trailing",
)


def make_unet(**overrides) -> UNet2DConditionModel:
    config = dict(UNET_CONFIG)
    config.update(overrides)
    return UNet2DConditionModel(**config)


class ClassEmbedding(ModelMixin, ConfigMixin):
    """Digit label -> the UNet's `encoder_hidden_states` ([B, tokens, cross_dim]).

    Index `num_classes` is the learned null class (the unconditional branch of CFG)."""

    @register_to_config
    def __init__(self, num_classes: int = NUM_CLASSES, cross_attention_dim: int = CROSS_DIM, tokens: int = 1):
        super().__init__()
        self.embedding = torch.nn.Embedding(num_classes + 1, cross_attention_dim * tokens)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        e = self.embedding(labels.long())
        return e.view(labels.shape[0], self.config.tokens, self.config.cross_attention_dim)


class DigitClassifier(torch.nn.Module):
    """A small conv net on 32x32 digits in [-1, 1]; `features` (128-d) feed the quality metric (FID)."""

    FEATURES = 128

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = torch.nn.Linear(64 * 4 * 4, self.FEATURES)
        self.fc2 = torch.nn.Linear(self.FEATURES, NUM_CLASSES)
        self.dropout = torch.nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 16
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 4
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.features(x)))


# --- The second embedded model: a small class-conditional diffusion transformer (flow matching) ---

# diffusers' DiTTransformer2DModel in pixel space: 32x32x1 in 2x2 patches -> a 16x16 grid of 256 tokens,
# 4 blocks of 4 heads x 32 channels (width 128), adaLN-Zero conditioning on timestep + class. One output
# channel (the flow velocity; no learned sigma). `num_embeds_ada_norm=10`: every block's label table has
# 11 rows and row 10 (`NULL_CLASS`) is the null class of classifier-free guidance. 1.42 M parameters
# (2.7 MiB in fp16; every block carries its own timestep MLP and label table, as diffusers builds DiT).
DIT_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    out_channels=1,
    num_layers=4,
    sample_size=IMAGE_SIZE,
    patch_size=2,
    norm_type="ada_norm_zero",
    num_embeds_ada_norm=NUM_CLASSES,
)

# Flow matching: x_sigma = (1 - sigma) x0 + sigma eps, the model predicts v = eps - x0 at timestep
# sigma * 1000 (FlowMatchEulerDiscreteScheduler's timesteps). shift=1: sampling sigmas are spaced
# evenly, matching the uniform sigma of training. Shifts > 1 (SD3 uses 3) move steps towards high noise
# for large images, whose redundancy keeps their structure visible up to high sigma; a 32x32 digit
# (1,024 values) has none to spare, so no shift is needed.
FLOW_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)


def make_dit(init: bool = True, **overrides):
    """A `DiTTransformer2DModel` of `DIT_CONFIG`; `init`: DiT's own initialisation (xavier linears,
    N(0, 0.02) timestep MLPs and label tables, zero adaLN modulation and output layers, so every block
    starts as the identity and the output as zero), which diffusers leaves to the checkpoint.

    The built-in label dropout of diffusers' `LabelEmbedding` (`class_dropout_prob=0.1` in
    `CombinedTimestepLabelEmbeddings`) is switched off here: it draws from the global RNG, separately in
    every block (and again for the output layer, which reuses block 0's embedding), so a label is
    dropped in some blocks but not others and the all-null input that CFG's unconditional branch
    feeds is almost never seen. The training loop drops labels itself, the same for all blocks."""
    from diffusers import DiTTransformer2DModel

    config = dict(DIT_CONFIG)
    config.update(overrides)
    model = DiTTransformer2DModel(**config)
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    if init:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    torch.nn.init.xavier_uniform_(module.weight)
                    if module.bias is not None:
                        torch.nn.init.zeros_(module.bias)
            w = model.pos_embed.proj.weight
            torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            torch.nn.init.zeros_(model.pos_embed.proj.bias)
            for block in model.transformer_blocks:
                emb = block.norm1.emb
                torch.nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
                torch.nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
                torch.nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
                torch.nn.init.zeros_(block.norm1.linear.weight)
                torch.nn.init.zeros_(block.norm1.linear.bias)
            for layer in (model.proj_out_1, model.proj_out_2):
                torch.nn.init.zeros_(layer.weight)
                torch.nn.init.zeros_(layer.bias)
    return model
