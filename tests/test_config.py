"""The settings' accepted types: numpy numbers and arrays are numbers and per-image values."""

import numpy as np
import pytest
import torch
from components import prompt_embeds, sd_pipeline

import sagfast


def per_image_latents(pipe, **config):
    pe, ne = prompt_embeds(2, seed=3)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    sagfast.enable(pipe, **config)
    call = dict(prompt_embeds=pe, negative_prompt_embeds=ne, latents=latents, height=32, width=32)
    return pipe(**call, guidance_scale=5.0, num_inference_steps=2, output_type="latent").images


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_numpy_array_is_one_value_per_image_as_a_list_is(dtype):
    pipe = sd_pipeline()
    want = per_image_latents(pipe, scale=[0.0, 0.5], pag_scale=[1.0, 0.0])
    got = per_image_latents(pipe, scale=np.array([0.0, 0.5], dtype=dtype), pag_scale=np.array([1.0, 0.0], dtype=dtype))
    assert torch.equal(got, want)
    assert (want[0] - want[1]).abs().max() > 0.01  # the two images were guided differently
    config = sagfast.SAGConfig(scale=np.array([0.0, 0.5], dtype=dtype))
    assert config.scale == (0.0, 0.5) and all(type(v) is float for v in config.scale)


@pytest.mark.parametrize(
    "value, message",
    [
        (np.array([[0.5, 0.5]]), r"scale must be a real number \(a 0-d real array is accepted\) \(or one value per image\)"),
        (np.array([0.5, -1.0]), "scale entries must be >= 0"),
        (np.array([0.5, np.inf]), "scale entries must be finite"),
        (np.array([True, False]), "scale entries must be a real number"),
        (np.array([], dtype=np.float32), "scale must be a number or a non-empty sequence of numbers"),
    ],
)
def test_a_bad_numpy_per_image_value_is_refused(value, message):
    with pytest.raises(ValueError, match=message):
        sagfast.SAGConfig(scale=value)


def test_a_0d_numpy_array_is_a_number():
    config = sagfast.SAGConfig(scale=np.array(0.5), threshold=np.array(1.5, dtype=np.float32))
    assert (config.scale, config.threshold) == (0.5, 1.5) and type(config.scale) is float is type(config.threshold)
