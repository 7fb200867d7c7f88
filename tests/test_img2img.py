"""img2img: parity with a step-by-step reference built from diffusers' components, resize modes, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import stablekit
from stablekit.cli import main
from stablekit.images import fit_picture, to_tensor

diffusers = pytest.importorskip("diffusers")

W, H = 96, 64
PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"


def make_picture(width: int = W, height: int = H, seed: int = 0) -> Image.Image:
    """A smooth picture with some structure: gradients plus a disc."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    disc = ((x - 0.5) ** 2 + (y - 0.3) ** 2 < 0.04).astype(np.float32)
    rgb = np.stack([x + 0.3 * disc, y, 1 - x * y + 0 * disc], -1) + 0.02 * rng.standard_normal((height, width, 3))
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request, tiny_models):
    tiny = tiny_models[request.param]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny.diffusers_dir, safety_checker=None)
    return tiny, stablekit.load(tiny.single_file), pipe


@torch.no_grad()
def reference_img2img(pipe, scheduler, picture: torch.Tensor, noise: torch.Tensor, steps: int, strength: float, cfg: float):
    """diffusers' img2img algorithm, step by step, with the latent mean and explicit noise."""
    ids = lambda text: pipe.tokenizer([text] * len(noise), padding="max_length", max_length=77,  # noqa: E731
                                      truncation=True, return_tensors="pt").input_ids
    context = torch.cat([pipe.text_encoder(ids(NEGATIVE))[0], pipe.text_encoder(ids(PROMPT))[0]])
    latents = pipe.vae.encode(picture * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
    latents = latents.expand(len(noise), -1, -1, -1)
    scheduler.set_timesteps(steps)
    run = int(steps * strength)
    timesteps = scheduler.timesteps[steps - run:]
    x = scheduler.add_noise(latents, noise, timesteps[:1])
    for t in timesteps:
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        uncond, cond = pipe.unet(x_in, t, encoder_hidden_states=context).sample.chunk(2)
        x = scheduler.step(uncond + cfg * (cond - uncond), t, x).prev_sample
    pictures = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return (pictures / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("sampler, schedule, diffusers_class", [
    ("DDIM", "automatic", "DDIMScheduler"),
    ("Euler", "leading", "EulerDiscreteScheduler"),  # the saved SD scheduler config says "leading"
])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_img2img_matches_diffusers_step_by_step(pair, sampler, schedule, diffusers_class, strength):
    tiny, engine, pipe = pair
    image = make_picture()
    noise = torch.randn((2, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(3))
    params = stablekit.GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=W, height=H, steps=10,
                                        cfg_scale=7.0, sampler=sampler, scheduler=schedule, seed=3, batch_size=2,
                                        denoising_strength=strength)
    ours, _ = engine.img2img_tensor(image, params, noise=noise)
    scheduler = getattr(diffusers, diffusers_class).from_config(pipe.scheduler.config)
    ref = reference_img2img(pipe, scheduler, to_tensor(image), noise, 10, strength, 7.0)
    err = (ours - ref).abs().max().item()
    print(f"\n[parity] {tiny.name} img2img {sampler} strength {strength}: max abs difference {err:.2e}")
    assert err < 5e-4 and ref.std() > 0.05


def test_strength_zero_returns_the_picture_and_low_strength_stays_close(pair):
    tiny, engine, _ = pair
    image = make_picture()
    base = dict(prompt=PROMPT, width=W, height=H, steps=10, seed=1, sampler="Euler")
    kept, _ = engine.img2img_tensor(image, stablekit.GenerationParams(**base, denoising_strength=0.0))
    assert torch.equal(kept, to_tensor(image))
    low, _ = engine.img2img_tensor(image, stablekit.GenerationParams(**base, denoising_strength=0.1))
    high, _ = engine.img2img_tensor(image, stablekit.GenerationParams(**base, denoising_strength=1.0))
    original = to_tensor(image)
    assert (low - original).abs().mean() < (high - original).abs().mean()


def test_img2img_batch_equals_single_runs(pair):
    tiny, engine, _ = pair
    base = dict(prompt=PROMPT, width=W, height=H, steps=6, sampler="Euler a", denoising_strength=0.6)
    batch, _ = engine.img2img_tensor(make_picture(), stablekit.GenerationParams(**base, seed=50, batch_size=2))
    second, _ = engine.img2img_tensor(make_picture(), stablekit.GenerationParams(**base, seed=51))
    torch.testing.assert_close(batch[1:], second, atol=1e-4, rtol=0)  # batched kernels sum in another order


@pytest.mark.parametrize("mode", ["just-resize", "crop-and-resize", "resize-and-fill"])
@pytest.mark.parametrize("size", [(96, 64), (64, 96), (40, 40)])
def test_fit_picture_sizes(mode, size):
    out = fit_picture(make_picture(120, 60), *size, mode=mode)
    assert out.size == size and out.mode == "RGB"


def test_crop_and_resize_keeps_the_centre_and_fill_keeps_everything():
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 255, 0), (50, 0, 150, 100))  # green centre square, red sides
    cropped = np.asarray(fit_picture(image, 64, 64, "crop-and-resize"))
    assert (cropped[:, :, 1] > 200).mean() > 0.95  # only the green centre survives a square crop
    filled = np.asarray(fit_picture(image, 64, 64, "resize-and-fill"))
    assert (filled[:, :, 0] > 200).mean() > 0.4  # the red sides are still there, plus stretched edges
    with pytest.raises(ValueError, match="unknown resize mode"):
        fit_picture(image, 64, 64, "stretch")


def test_cli_img2img_follows_the_picture_size_and_writes_infotext(tiny_models, tmp_path, capsys):
    src = tmp_path / "in.png"
    make_picture(100, 70).save(src)
    args = ["img2img", "--model", str(tiny_models["sd1"].single_file), "--image", str(src), "--prompt", "a cat",
            "--strength", "0.5", "--steps", "4", "--seed", "9", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "working at 96x64" in captured.err
    (path,) = captured.out.split()
    with Image.open(path) as im:
        assert im.size == (96, 64)
        assert "Denoising strength: 0.5" in im.info["parameters"] and "Size: 96x64" in im.info["parameters"]
    assert main(["img2img", "--model", str(tiny_models["sd1"].single_file), "--image", str(tmp_path / "nope.png"),
                 "--prompt", "x"]) == 2


def test_img2img_with_a_brownian_sampler_uses_a_tree_over_the_whole_schedule(tiny_models):
    """The SDE samplers' noise comes from the image seeds; in img2img the tree still spans the full schedule."""
    pytest.importorskip("torchsde")
    engine = stablekit.load(tiny_models["sd1"].single_file)
    base = dict(prompt=PROMPT, width=W, height=H, steps=6, sampler="DPM++ 2M SDE", denoising_strength=0.5)
    batch, _ = engine.img2img_tensor(make_picture(), stablekit.GenerationParams(**base, seed=60, batch_size=2))
    second, _ = engine.img2img_tensor(make_picture(), stablekit.GenerationParams(**base, seed=61))
    torch.testing.assert_close(batch[1:], second, atol=1e-4, rtol=0)  # batched kernels sum in another order
    other, _ = engine.img2img_tensor(make_picture(), stablekit.GenerationParams(**base, seed=62))
    assert (other - second).abs().max() > 1e-3  # the seed reaches the noise
