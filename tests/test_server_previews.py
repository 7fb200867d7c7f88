"""The engine hook the server stops jobs with, and the cheap latent preview."""

from __future__ import annotations

from dataclasses import replace

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


def _mean_colour(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)


@pytest.fixture(scope="module")
def demo():
    from stablekit.demo import demo_model

    return stablekit.load(demo_model())


def test_the_demo_models_previews_have_the_final_pictures_colours(demo):
    """The demo model's latent space is not SD's: SD's matrix shows other colours (measured about 107
    levels off in mean colour); the model's own small decoder previews what the picture will be."""
    from stablekit.server.previews import model_preview

    assert demo.config.vae.preview_decoder
    assert any(n.startswith("previews: the VAE's own decoder") for n in demo.loaded.notes)
    for prompt, seed in (("a red circle on a blue background", 1), ("a yellow star on a black background", 2)):
        last = {}
        final = demo.txt2img(prompt=prompt, seed=seed, steps=12, callback=lambda i, n, x: last.update(x=x))[0]
        preview = model_preview(last["x"][0], demo.loaded.model, demo.config.vae)
        assert np.abs(_mean_colour(preview) - _mean_colour(final)).mean() < 2
        sd_matrix = latent_preview(last["x"][0])
        assert np.abs(_mean_colour(sd_matrix) - _mean_colour(final)).mean() > 30


def test_sd_latents_keep_the_published_map_and_other_large_vaes_get_a_fitted_one(demo, monkeypatch):
    from stablekit.config import SD_PREVIEW_RGB, VAEConfig
    from stablekit.models import preview_fit

    vae = demo.loaded.model.vae
    cfg = replace(demo.config.vae, preview_decoder=False)
    assert preview_fit.with_preview(VAEConfig(), vae) == (VAEConfig(), None)  # SD's format: unchanged
    assert preview_fit.with_preview(cfg, vae)[0].preview_decoder
    monkeypatch.setattr(preview_fit, "SMALL_DECODER", 0)  # as if the decoder were large
    fitted, note = preview_fit.with_preview(cfg, vae)
    assert not fitted.preview_decoder and note == "previews: a colour map fitted from the VAE"
    assert len(fitted.preview_rgb) == cfg.z_channels
    # on pictures it was not fitted on, the map predicts the decoded colours far better than SD's
    pictures = preview_fit.synthetic_pictures(12, 64, seed=5)
    with torch.no_grad():
        mean, _ = vae.encode(pictures)
        target = torch.nn.functional.avg_pool2d(vae.decode(mean).clamp(-1, 1), 8)
    latents = mean * cfg.scale_factor

    def error(matrix, bias):
        predicted = torch.einsum("bchw,cr->brhw", latents, torch.tensor(matrix)) + torch.tensor(bias)[:, None, None]
        return (predicted - target).abs().mean().item()
    assert error(fitted.preview_rgb, fitted.preview_bias) < 0.5 * error(SD_PREVIEW_RGB, (0, 0, 0))
