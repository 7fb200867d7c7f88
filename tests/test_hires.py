"""Hires fix: parity with a two-pass reference built step by step from diffusers' components (first pass,
the web UI's enlarging, an img2img pass of exactly the hires steps on the tail of a longer schedule with
each seed's fresh noise), target sizes, denoise 0, bad input, CLI and HTTP."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import stablekit
from stablekit.cli import main
from stablekit.params import GenerationParams
from stablekit.pipeline.editing import Canvas
from stablekit.pipeline.steps import decode
from stablekit.pipeline.tasks import txt2img_latents

diffusers = pytest.importorskip("diffusers")

PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
W, H = 64, 48


@pytest.fixture(scope="module")
def pair(tiny_models):
    tiny = tiny_models["sd1"]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny.diffusers_dir, safety_checker=None)
    return stablekit.load(tiny.single_file), pipe


def seeded(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_hires(pipe, seeds: list[int], steps: int, hires_steps: int, denoise: float, upscaler: str,
                    cfg: float = 7.0) -> torch.Tensor:
    """Both passes with diffusers' Euler scheduler; the enlarging as the web UI does it."""
    ids = lambda text: pipe.tokenizer([text] * len(seeds), padding="max_length", max_length=77,  # noqa: E731
                                      truncation=True, return_tensors="pt").input_ids
    context = torch.cat([pipe.text_encoder(ids(NEGATIVE))[0], pipe.text_encoder(ids(PROMPT))[0]])
    scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scale = pipe.vae.config.scaling_factor

    def sample(x, timesteps):
        for t in timesteps:
            x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            uncond, cond = pipe.unet(x_in, t, encoder_hidden_states=context).sample.chunk(2)
            x = scheduler.step(uncond + cfg * (cond - uncond), t, x).prev_sample
        return x

    scheduler.set_timesteps(steps)
    noise = torch.cat([seeded(s, (1, 4, H // 8, W // 8)) for s in seeds])
    # The web UI starts at noise * sigma_max (diffusers' "leading" Euler would use sqrt(sigma_max^2 + 1)).
    latents = sample(noise * scheduler.sigmas[0], scheduler.timesteps)
    if upscaler == "latent":
        big = F.interpolate(latents, size=(2 * H // 8, 2 * W // 8), mode="bilinear")
    else:  # decode, 8-bit pictures (truncated, as the web UI), Lanczos, encode (the latent mean)
        pictures = ((pipe.vae.decode(latents / scale).sample + 1) / 2).clamp(0, 1)
        arrays = [(255 * p.permute(1, 2, 0).numpy()).astype(np.uint8) for p in pictures]
        resized = [np.asarray(Image.fromarray(a).resize((2 * W, 2 * H), Image.Resampling.LANCZOS)) for a in arrays]
        tensor = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255
        big = pipe.vae.encode(tensor * 2 - 1).latent_dist.mean * scale
    total = int(hires_steps / denoise)
    scheduler.set_timesteps(total)
    timesteps = scheduler.timesteps[total - hires_steps:]
    noise = torch.cat([seeded(s, (1, 4, 2 * H // 8, 2 * W // 8)) for s in seeds])  # each seed's first draw, again
    x = sample(scheduler.add_noise(big, noise, timesteps[:1]), timesteps)
    return ((pipe.vae.decode(x / scale).sample + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_fix_matches_a_two_pass_reference(pair, upscaler):
    engine, pipe = pair
    params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=W, height=H, steps=6, sampler="Euler",
                              scheduler="leading", seed=40, batch_size=2, hires_scale=2, hires_steps=4,
                              hires_denoise=0.55, hires_upscaler=upscaler)  # the saved SD scheduler says "leading"
    ours, _ = engine.txt2img_tensor(params)
    ref = reference_hires(pipe, [40, 41], 6, 4, 0.55, upscaler)
    err = (ours - ref).abs().max().item()
    print(f"\n[parity] hires fix ({upscaler}) vs the two-pass reference: max abs difference {err:.2e}")
    assert ours.shape == (2, 3, 2 * H, 2 * W) and err < 2e-3 and ref.std() > 0.05


def test_denoise_zero_returns_the_enlarged_first_pass(pair):
    engine, _ = pair
    p = GenerationParams(prompt=PROMPT, width=W, height=H, steps=4, seed=3, hires_scale=1.5, hires_denoise=0.0,
                         hires_upscaler="latent-bicubic").validated()
    ours, _ = engine.txt2img_tensor(p)
    first = txt2img_latents(engine.context, p, Canvas())
    want = decode(engine.loaded.model, F.interpolate(first, size=(H * 3 // 16, W * 3 // 16), mode="bicubic"))
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("resize, size", [((128, 0), (128, 96)), ((0, 72), (96, 72)), ((96, 96), (96, 96)),
                                          ((160, 80), (160, 80))])
def test_hires_resize_keeps_the_aspect_or_covers_and_crops(pair, resize, size):
    engine, _ = pair
    p = GenerationParams(prompt=PROMPT, width=W, height=H, steps=2, seed=1, hires_resize=resize, hires_steps=1)
    images = engine.txt2img(p)
    assert images[0].size == size
    assert f"Hires resize: {resize[0]}x{resize[1]}" in images[0].info["parameters"]


@pytest.mark.parametrize("fields, words", [
    ({"hires_scale": 0.5}, "hires scale must be between 1 and 8"),
    ({"hires_scale": 2, "hires_upscaler": "ESRGAN"}, "unknown hires upscaler 'ESRGAN'"),
    ({"hires_resize": (0, 0)}, "hires resize"),
    ({"hires_scale": 2, "hires_denoise": 1.5}, "hires denoising strength"),
    ({"hires_scale": 2, "hires_sampler": "nope"}, "unknown sampler"),
])
def test_bad_hires_values_are_clear_errors(fields, words):
    with pytest.raises(ValueError, match=words):
        GenerationParams(**fields).validated()


def test_the_x4_upscaler_choice_without_an_upscaler_model_is_a_clear_error(pair):
    engine, _ = pair
    with pytest.raises(ValueError, match="x4 upscaler model"):
        engine.txt2img(prompt=PROMPT, width=W, height=H, steps=2, hires_scale=2, hires_upscaler="x4")


def test_web_ui_upscaler_names_are_accepted():
    p = GenerationParams(hires_scale=2, hires_upscaler="Latent (nearest-exact)").validated()
    assert p.hires_upscaler == "latent-nearest-exact"


def test_cli_hires_writes_the_web_uis_infotext(tiny_models, tmp_path, capsys):
    args = ["txt2img", "--model", str(tiny_models["sd1"].single_file), "--prompt", "a cat", "--steps", "3",
            "--width", "64", "--height", "48", "--seed", "2", "--hires-scale", "2", "--hires-steps", "2",
            "--hires-denoise", "0.5", "--hires-sampler", "Euler a", "--hires-prompt", "a big cat",
            "--out", str(tmp_path)]
    assert main(args) == 0
    image = Image.open(capsys.readouterr().out.strip().splitlines()[-1])
    assert image.size == (128, 96)
    text = image.info["parameters"]
    for part in ("Size: 64x48", "Denoising strength: 0.5", "Hires upscale: 2", "Hires steps: 2",
                 "Hires upscaler: Latent", "Hires sampler: Euler a", "Hires prompt: a big cat"):
        assert part in text, text


def test_http_enable_hr_and_the_upscaler_lists(tiny_models, pair, tmp_path):
    from fastapi.testclient import TestClient

    from stablekit.server.app import create_app
    from stablekit.server.config import ServerConfig

    engine, _ = pair
    config = ServerConfig(model=str(tiny_models["sd1"].single_file), outputs=tmp_path)
    body = {"prompt": PROMPT, "steps": 3, "width": 64, "height": 48, "seed": 8, "enable_hr": True, "hr_scale": 2,
            "hr_upscaler": "Latent (antialiased)", "hr_second_pass_steps": 2, "denoising_strength": 0.6}
    with TestClient(create_app(config, loader=lambda spec: engine)) as client:
        r = client.post("/sdapi/v1/txt2img", json=body)
        legacy = client.post("/sdapi/v1/txt2img", json={**body, "width": 128, "height": 96, "firstphase_width": 64,
                                                         "firstphase_height": 48})
        upscalers = client.get("/sdapi/v1/upscalers").json()
        modes = client.get("/sdapi/v1/latent-upscale-modes").json()
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["denoising_strength"] == 0.6 and "Hires upscaler: Latent (antialiased)" in info["infotexts"][0]
    picture = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert picture.size == (128, 96)
    assert legacy.status_code == 200 and "Hires resize: 128x96" in json.loads(legacy.json()["info"])["infotexts"][0]
    assert [u["name"] for u in upscalers] == ["Lanczos", "Nearest", "None"]
    assert {m["name"] for m in modes} >= {"Latent", "Latent (bicubic antialiased)", "Latent (nearest-exact)"}
    want = engine.txt2img(prompt=PROMPT, steps=3, width=64, height=48, seed=8, sampler="Euler", hires_scale=2,
                          hires_upscaler="latent-antialiased", hires_steps=2, hires_denoise=0.6)[0]
    assert np.array_equal(np.asarray(picture), np.asarray(want))


def test_a_hires_sampler_name_keeps_its_schedule_and_a_tiny_target_is_refused():
    p = GenerationParams(hires_scale=2, hires_sampler="Euler Karras").validated()
    assert (p.hires_sampler, p.hires_scheduler) == ("Euler", "karras")
    with pytest.raises(ValueError, match="unknown schedule"):
        GenerationParams(hires_scale=2, hires_scheduler="wobbly").validated()
    from stablekit.pipeline.hires import hires_target

    with pytest.raises(ValueError, match="under 8 pixels a side"):
        hires_target(GenerationParams(width=64, height=32, hires_resize=(8, 0)).validated())


def test_the_hires_pass_continues_the_prompt_editing_timeline(pair):
    """The web UI's hires conditioning: step numbers count on from the first pass, so [cat:dog:10] with
    20 + 20 steps is "dog" for the whole second pass (and 10 steps of each in the first)."""
    from stablekit.pipeline.text import TextSettings, encode_prompt

    engine, _ = pair
    ctx, settings = engine.context, TextSettings()
    first, _ = encode_prompt(ctx, "a [cat:dog:10]", 1, 20, settings)
    second, _ = encode_prompt(ctx, "a [cat:dog:10]", 1, 20, settings, after=20)
    dog, _ = encode_prompt(ctx, "a dog", 1, 20, settings)
    assert len(first.entries) == 2 and len(second.entries) == 1
    assert torch.equal(second.entries[0][1].crossattn, dog.entries[0][1].crossattn)


def test_hires_prompt_loras_must_be_the_prompts(pair):
    engine, _ = pair
    with pytest.raises(ValueError, match="hires prompt's <lora:...> tags"):
        engine.txt2img(prompt=PROMPT, width=W, height=H, steps=2, hires_scale=2, hires_prompt="x <lora:detail:1>")


def test_http_hires_limits_cover_every_size_it_works_at(tiny_models, pair, tmp_path):
    from fastapi.testclient import TestClient

    from stablekit.server.app import create_app
    from stablekit.server.config import Limits, ServerConfig

    engine, _ = pair
    config = ServerConfig(model=str(tiny_models["sd1"].single_file), outputs=tmp_path,
                          limits=Limits(max_pixels=128 * 128, max_steps=30))
    base = {"prompt": "p", "steps": 2, "width": 16, "height": 128, "enable_hr": True}
    with TestClient(create_app(config, loader=lambda spec: engine)) as client:
        box = client.post("/sdapi/v1/txt2img", json={**base, "hr_resize_x": 128, "hr_resize_y": 128})
        steps = client.post("/sdapi/v1/txt2img", json={**base, "hr_scale": 1, "hr_second_pass_steps": 31})
        subseed = client.post("/sdapi/v1/txt2img", json={"prompt": "p", "steps": 2, "width": 16, "height": 16,
                                                          "subseed": 2**32 - 2, "subseed_strength": 0.5, "n_iter": 3})
    assert box.status_code == 400 and "128x1024 is over" in box.json()["errors"]  # covered before cropping
    assert steps.status_code == 400 and "hr_second_pass_steps 31" in steps.json()["errors"]
    assert subseed.status_code == 400 and "subseed" in subseed.json()["errors"]
