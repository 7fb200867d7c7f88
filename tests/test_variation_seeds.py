"""Variation seeds and seed resize: the web UI's algorithm (modules/rng.py, ImageRNG.first), checked against
a reference written here from its published description in numpy, column by column, and through the
whole pipeline, the CLI and HTTP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import stablekit
from stablekit.cli import main
from stablekit.params import GenerationParams
from stablekit.pipeline.seeds import first_noise
from stablekit.pipeline.steps import generators_for


def randn(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The first draw of a seed: what torch.manual_seed(seed); torch.randn(shape) gives on the CPU."""
    torch.manual_seed(seed)
    return torch.randn(shape).numpy().astype(np.float64)


def reference_slerp(t: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The web UI's slerp, one (channel, column) pair at a time: the angle between the two columns."""
    c, h, w = low.shape
    dots = np.array([[np.dot(low[i, :, j] / np.linalg.norm(low[i, :, j]), high[i, :, j] / np.linalg.norm(high[i, :, j]))
                      for j in range(w)] for i in range(c)])
    if dots.mean() > 0.9995:
        return low * t + high * (1 - t)  # the published fallback, weights as written there
    out = np.empty_like(low)
    for i in range(c):
        for j in range(w):
            omega = np.arccos(dots[i, j])
            out[i, :, j] = (np.sin((1 - t) * omega) * low[i, :, j] + np.sin(t * omega) * high[i, :, j]) / np.sin(omega)
    return out


def reference_first(seed: int, subseed: int, strength: float, shape: tuple[int, int, int],
                    resize_from: tuple[int, int] | None) -> np.ndarray:
    """One image's first noise: drawn at the resize-from size if given, slerped, pasted centred."""
    small = shape if resize_from is None else (shape[0], resize_from[1] // 8, resize_from[0] // 8)
    noise = randn(seed, small)
    if strength:
        noise = reference_slerp(strength, noise, randn(subseed, small))
    if small == shape:
        return noise
    full = randn(seed, shape)
    # Per axis, the offset d = (full - small) // 2: the small noise goes in at d, or, where it is larger,
    # loses -d cells at the start and keeps small + 2d of them (so an odd excess loses one more at the end).
    def span(big: int, little: int) -> tuple[range, int]:
        d = (big - little) // 2
        return (range(d, d + little), 0) if d >= 0 else (range(0, little + 2 * d), -d)
    rows, sy = span(shape[1], small[1])
    cols, sx = span(shape[2], small[2])
    for y in rows:
        for x in cols:
            full[:, y, x] = noise[:, sy + y - rows.start, sx + x - cols.start]
    return full


@pytest.mark.parametrize("strength, resize_from", [
    (0.0, None), (0.3, None), (1.0, None), (0.5, (96, 48)), (0.0, (40, 120)), (0.7, (64, 64)),
])
def test_first_noise_follows_the_published_algorithm(strength, resize_from):
    p = GenerationParams(seed=11, subseed=500, subseed_strength=strength, seed_resize_from=resize_from,
                         batch_size=2, width=64, height=80).validated()
    shape = (4, 10, 8)
    ours = first_noise(p, generators_for(p.image_seeds), shape).numpy()
    for i in range(2):
        seed = 11 if strength else 11 + i  # with a strength the batch shares the seed
        ref = reference_first(seed, 500 + i, strength, shape, resize_from)
        assert np.abs(ours[i] - ref).max() < 1e-5


def test_strength_one_gives_the_subseeds_noise_and_generators_continue_as_without_variation():
    shape = (4, 8, 8)
    p = GenerationParams(seed=3, subseed=9, subseed_strength=1.0, width=64, height=64).validated()
    gens = generators_for(p.image_seeds)
    noise = first_noise(p, gens, shape)
    assert torch.allclose(noise[0], torch.from_numpy(randn(9, shape)).float(), atol=1e-5)
    plain = generators_for([3])
    first_noise(GenerationParams(seed=3, width=64, height=64).validated(), plain, shape)
    # The sampler's later draws (ancestral noise) come from the main seed's generator, one full draw in.
    assert torch.equal(torch.randn(shape, generator=gens[0]), torch.randn(shape, generator=plain[0]))


@pytest.fixture(scope="module")
def engine(tiny_models):
    return stablekit.load(tiny_models["sd1"].single_file)


def test_the_pipeline_uses_the_variation_noise_and_writes_the_web_uis_infotext(engine):
    base = dict(prompt="a boat", steps=4, seed=21, width=64, height=48, sampler="Euler a", batch_size=2)
    p = GenerationParams(**base, subseed=77, subseed_strength=0.4, seed_resize_from=(80, 48)).validated()
    noise = torch.from_numpy(np.stack([reference_first(21, 77 + i, 0.4, (4, 6, 8), (80, 48)) for i in range(2)]))
    ours, _ = engine.txt2img_tensor(p)
    # Explicit noise replaces only the first draw; the ancestral draws still come from each seed's generator.
    explicit, _ = engine.txt2img_tensor(GenerationParams(**{**base, "seed": 21}, subseed_strength=0.4, subseed=77,
                                                         seed_resize_from=(80, 48)), noise=noise.float())
    torch.testing.assert_close(ours, explicit, atol=1e-5, rtol=0)
    plain, _ = engine.txt2img_tensor(GenerationParams(**base))
    assert (ours - plain).abs().max() > 0.01
    images = engine.txt2img(p)
    text = images[1].info["parameters"]
    assert "Seed: 21," in text and "Variation seed: 78, Variation seed strength: 0.4, Seed resize from: 80x48" in text


@pytest.mark.parametrize("fields, words", [
    ({"subseed_strength": 1.5}, "subseed strength"),
    ({"subseed": -5}, "subseed must be"),
    ({"seed_resize_from": (4, 64)}, "seed resize from"),
])
def test_bad_variation_values_are_clear_errors(fields, words):
    with pytest.raises(ValueError, match=words):
        GenerationParams(**fields).validated()


def test_cli_variation_flags(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["txt2img", "--model", str(tiny_models["sd1"].single_file), "--prompt", "a cat", "--steps", "2",
            "--width", "64", "--height", "64", "--seed", "5", "--subseed", "6", "--subseed-strength", "0.25",
            "--seed-resize-from", "128x64", "--out", str(out)]
    assert main(args) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    text = Image.open(path).info["parameters"]
    assert "Variation seed: 6, Variation seed strength: 0.25, Seed resize from: 128x64" in text
    with pytest.raises(SystemExit) as exit_:
        main(args[:-2] + ["--seed-resize-from", "wide", "--out", str(out)])
    assert exit_.value.code == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


def test_http_variation_fields(tiny_models, engine, tmp_path):
    from fastapi.testclient import TestClient

    from stablekit.server.app import create_app
    from stablekit.server.config import ServerConfig

    config = ServerConfig(model=str(tiny_models["sd1"].single_file), outputs=tmp_path)
    with TestClient(create_app(config, loader=lambda spec: engine)) as client:
        body = {"prompt": "a boat", "steps": 3, "width": 64, "height": 48, "seed": 21, "batch_size": 2, "n_iter": 2,
                "subseed": 77, "subseed_strength": 0.4, "seed_resize_from_w": 80, "seed_resize_from_h": 48}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [21] * 4 and info["all_subseeds"] == [77, 78, 79, 80]
    assert info["subseed_strength"] == 0.4 and (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (80, 48)
    assert "Variation seed: 80" in info["infotexts"][3]
