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
