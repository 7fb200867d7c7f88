"""The upscale task on a tiny SD x4 upscaler: parity with diffusers' StableDiffusionUpscalePipeline (a CPU
generator per seed: augmentation noise, then latent noise), exact 4x sizes, tiling, bad input, CLI, HTTP."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

import stablekit
from stablekit.cli import main
from stablekit.images import to_tensor
from stablekit.pipeline.upscale import tiled_unet

from .test_img2img import make_picture
from .test_server_jobs import wait_for

diffusers = pytest.importorskip("diffusers")

PROMPT, NEGATIVE = "a sharp photo", "blurry"


@pytest.fixture(scope="module")
def pair(tiny_upscaler):
    pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(tiny_upscaler.diffusers_dir)
    return stablekit.load(tiny_upscaler.single_file), pipe


@pytest.mark.parametrize("noise_level", [20, 150])
def test_upscale_matches_diffusers(pair, noise_level):
    engine, pipe = pair
    image = make_picture(24, 16)
    ours, p = engine.run_tensor("upscale", stablekit.GenerationParams(
        prompt=PROMPT, negative_prompt=NEGATIVE, steps=8, cfg_scale=9.0, sampler="DDIM", seed=12,
        noise_level=noise_level), image=image)
    ref = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=image, num_inference_steps=8, guidance_scale=9.0,
               noise_level=noise_level, generator=torch.Generator().manual_seed(12), output_type="pt").images
    err = (ours - ref).abs().max().item()
    print(f"\n[parity] upscale (noise level {noise_level}) vs diffusers: max abs difference {err:.2e}")
    assert ours.shape == (1, 3, 64, 96) and err < 2e-3 and ref.std() > 0.05


def test_output_is_exactly_4x_for_any_size(pair):
    engine, _ = pair
    for size in ((20, 13), (8, 8), (33, 17)):
        out = engine.upscale(make_picture(*size), prompt=PROMPT, steps=2, seed=1)[0]
        assert out.size == (4 * size[0], 4 * size[1])
        assert "Noise level: 20" in out.info["parameters"]


def test_tiles_covering_the_picture_equal_the_untiled_run(pair):
    engine, _ = pair
    base = dict(prompt=PROMPT, steps=3, seed=5)
    whole, _ = engine.run_tensor("upscale", stablekit.GenerationParams(**base), image=make_picture(24, 16))
    covered, _ = engine.run_tensor("upscale", stablekit.GenerationParams(**base, upscale_tile=32),
                                   image=make_picture(24, 16))
    assert torch.equal(whole, covered)


def test_tiled_network_call_is_seamless(pair):
    """The tiled UNet's output moves smoothly across tile borders: no step larger than the untiled
    output's own neighbour-to-neighbour changes, and close to the untiled output everywhere."""
    engine, _ = pair
    unet = engine.loaded.model.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 48, generator=g)
    y, x_ = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 48), indexing="ij")
    low = torch.stack([x_, y, x_ * y])[None]  # a smooth low-res picture
    from stablekit.diffusion.cond import Cond

    cond = Cond(torch.randn(1, 77, 160, generator=g), torch.tensor([20]), low)
    t = torch.tensor([500.0])
    with torch.no_grad():
        plain = unet(x, t, cond)
        tiles = tiled_unet(unet, 16, 4)(x, t, cond)
    assert tiles.shape == plain.shape
    jumps = (tiles[..., 1:] - tiles[..., :-1]).abs().amax(dim=(0, 1, 2))  # per column border
    own = (plain[..., 1:] - plain[..., :-1]).abs().amax(dim=(0, 1, 2))
    assert (jumps <= own.max() * 1.05).all()
    assert (tiles - plain).abs().mean() < 0.5 * plain.abs().mean()


@pytest.mark.parametrize("fields, words", [
    ({"noise_level": 351}, "noise level must be a whole number from 0 to 350"),
    ({"upscale_tile": 8}, "tile must be 0"),
])
def test_bad_upscale_values_are_clear_errors(fields, words):
    with pytest.raises(ValueError, match=words):
        stablekit.GenerationParams(**fields).validated()


def test_models_of_the_wrong_kind_are_named(pair, tiny_models):
    engine, _ = pair
    with pytest.raises(ValueError, match="img2img needs a base model.*this is an upscaler"):
        engine.img2img(make_picture(16, 16), steps=2)
    base = stablekit.load(tiny_models["sd1"].single_file)
    with pytest.raises(ValueError, match="upscale needs an upscaler.*this is a base model"):
        base.upscale(make_picture(16, 16), steps=2)


def test_cli_upscale(tiny_upscaler, tmp_path, capsys):
    src = tmp_path / "small.png"
    make_picture(20, 12).save(src)
    assert main(["upscale", "--model", str(tiny_upscaler.single_file), "--image", str(src), "--prompt", "a cat",
                 "--steps", "2", "--noise-level", "30", "--tile", "16", "--out", str(tmp_path)]) == 0
    out = Image.open(capsys.readouterr().out.strip().splitlines()[-1])
    assert out.size == (80, 48)
    assert "Noise level: 30, Tile: 16" in out.info["parameters"]
    assert main(["upscale", "--model", str(tiny_upscaler.single_file), "--image", str(src), "--prompt", "a cat",
                 "--noise-level", "400", "--out", str(tmp_path)]) == 2
    assert "noise level" in capsys.readouterr().err


def test_http_upscale_job(tiny_upscaler, pair, tmp_path):
    from fastapi.testclient import TestClient

    from stablekit.server.app import create_app
    from stablekit.server.config import ServerConfig

    engine, _ = pair
    buf = io.BytesIO()
    make_picture(16, 16).save(buf, format="PNG")
    config = ServerConfig(model=str(tiny_upscaler.single_file), outputs=tmp_path)
    with TestClient(create_app(config, loader=lambda spec: engine)) as client:
        r = client.post("/api/v1/jobs", json={"task": "upscale", "init_images": [base64.b64encode(buf.getvalue()).decode()],
                                              "prompt": "a cat", "steps": 2, "seed": 4, "noise_level": 40})
        assert r.status_code == 202, r.text
        job = wait_for(client, r.json()["id"])
        assert job["status"] == "done", job
        picture = Image.open(io.BytesIO(client.get(job["images"][0]).content))
    want = engine.upscale(make_picture(16, 16), prompt="a cat", steps=2, seed=4, noise_level=40)[0]  # DDIM, CFG 9
    assert picture.size == (64, 64) and np.array_equal(np.asarray(picture), np.asarray(want))


def test_to_tensor_of_the_padded_picture_keeps_the_original(pair):
    from stablekit.pipeline.upscale import upscale_canvas

    image = make_picture(13, 9)
    canvas = upscale_canvas(image, torch.device("cpu"))
    assert canvas.picture.shape == (1, 3, 16, 16)
    assert torch.equal(canvas.picture[..., :9, :13], to_tensor(image))


@pytest.fixture(scope="module")
def base_with_upscaler(tiny_models, tiny_upscaler):
    return stablekit.load(tiny_models["sd1"].single_file, upscaler=tiny_upscaler.single_file)


def test_hires_fix_with_the_x4_upscaler(base_with_upscaler):
    engine = base_with_upscaler
    image = engine.txt2img(prompt=PROMPT, width=32, height=24, steps=2, seed=3, hires_scale=2, hires_steps=1,
                           hires_upscaler="x4")[0]
    assert image.size == (64, 48) and "Hires upscaler: SD x4" in image.info["parameters"]
    with pytest.raises(ValueError, match="must be an SD x4 upscaler; this is a base model"):
        engine.set_upscaler(engine)


def test_extras_single_image_upscalers(tiny_upscaler, tiny_models, base_with_upscaler, tmp_path):
    from fastapi.testclient import TestClient

    from stablekit.server.app import create_app
    from stablekit.server.config import ServerConfig

    buf = io.BytesIO()
    make_picture(16, 12).save(buf, format="PNG")
    picture = base64.b64encode(buf.getvalue()).decode()
    config = ServerConfig(model=str(tiny_models["sd1"].single_file), outputs=tmp_path,
                          upscaler_model=str(tiny_upscaler.single_file))
    with TestClient(create_app(config, loader=lambda spec: base_with_upscaler)) as client:
        x4 = client.post("/sdapi/v1/extra-single-image", json={"image": picture, "upscaler_1": "SD x4",
                                                                 "upscaling_resize": 4})
        lanczos = client.post("/sdapi/v1/extra-single-image", json={"image": picture, "upscaler_1": "Lanczos",
                                                                      "upscaling_resize": 2})
        unknown = client.post("/sdapi/v1/extra-single-image", json={"image": picture, "upscaler_1": "ESRGAN_4x"})
        covered = client.post("/sdapi/v1/extra-single-image", json={"image": picture, "upscaler_1": "Lanczos",
                                                                      "resize_mode": 1, "upscaling_resize_w": 24,
                                                                      "upscaling_resize_h": 24})
        no_size = client.post("/sdapi/v1/extra-single-image", json={"image": picture, "resize_mode": 1,
                                                                      "upscaling_resize_w": None})
        names = [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
    assert x4.status_code == 200, x4.text
    assert Image.open(io.BytesIO(base64.b64decode(x4.json()["image"]))).size == (64, 48)
    assert Image.open(io.BytesIO(base64.b64decode(lanczos.json()["image"]))).size == (32, 24)
    assert unknown.status_code == 400 and "ESRGAN_4x" in unknown.json()["errors"]
    assert Image.open(io.BytesIO(base64.b64decode(covered.json()["image"]))).size == (24, 24)  # covered, cropped
    assert no_size.status_code == 400 and "upscaling_resize_w" in no_size.json()["errors"]
    assert "SD x4" in names
