"""The engine hook the server stops jobs with, and the cheap latent preview."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stablekit
from stablekit.diffusion.common import SamplingStopped
from stablekit.images import to_pil
from stablekit.pipeline.steps import decode
from stablekit.server.previews import LATENT_RGB, latent_preview


@pytest.fixture(scope="module")
def sd1(tiny_models):
    return stablekit.load(tiny_models["sd1"].single_file)


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDIM"])
def test_a_callback_can_stop_sampling_and_the_last_estimate_is_decoded(sd1, sampler):
    seen = []

    def stop_at_3(i, n, x0):
        seen.append(x0.clone())
        if i == 2:
            raise SamplingStopped()

    params = stablekit.GenerationParams(prompt="p", width=64, height=64, steps=10, seed=2, sampler=sampler)
    stopped = sd1.txt2img(params, callback=stop_at_3)
    assert len(seen) == 3  # no step ran after the stop
    expected = to_pil(decode(sd1.context.model, seen[-1]))[0]
    assert np.array_equal(np.asarray(stopped[0]), np.asarray(expected))
    assert not np.array_equal(np.asarray(stopped[0]), np.asarray(sd1.txt2img(params)[0]))


def test_other_exceptions_from_a_callback_propagate(sd1):
    def boom(i, n, x0):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sd1.txt2img(prompt="p", width=64, height=64, steps=3, seed=1, callback=boom)


def test_latent_preview_is_the_web_uis_linear_map():
    latent = torch.zeros(4, 2, 3)
    latent[1, 0, 0] = 1.0  # one pixel on latent channel 1 only
    image = np.asarray(latent_preview(latent[None]))
    assert image.shape == (2, 3, 3)
    expected = np.round((np.clip(LATENT_RGB[1].numpy(), -1, 1) + 1) / 2 * 255)
    assert np.array_equal(image[0, 0], expected.astype(np.uint8))
    assert np.array_equal(image[1, 2], np.array([128, 128, 128], np.uint8))  # zero latent: mid grey
    assert latent_preview(latent, scale=8).size == (24, 16)
