"""Inpainting by both methods against step-by-step references from diffusers' components,
paste-back, masked content and mask formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import stablekit
from stablekit.images import to_tensor
from stablekit.masks import gaussian_blur, mask_from_picture

from .test_img2img import make_picture

diffusers = pytest.importorskip("diffusers")

W, H = 96, 64
PROMPT, NEGATIVE = "a yellow star", "blurry"


def make_mask(width: int = W, height: int = H) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (24, 16, 64, 48))  # white repaints
    return mask


def params(**fields) -> stablekit.GenerationParams:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=W, height=H, steps=8, cfg_scale=7.0, seed=5,
                batch_size=2, mask_blur=0.0, paste_back=False)
    return stablekit.GenerationParams(**{**base, **fields})


def _context(pipe, n):
    ids = lambda text: pipe.tokenizer([text] * n, padding="max_length", max_length=77,  # noqa: E731
                                      truncation=True, return_tensors="pt").input_ids
    return torch.cat([pipe.text_encoder(ids(NEGATIVE))[0], pipe.text_encoder(ids(PROMPT))[0]])


@torch.no_grad()
def reference_inpaint(pipe, scheduler, picture, mask, noise, steps, strength, cfg, nine_channel):
    """diffusers' StableDiffusionInpaintPipeline algorithm, step by step, with latent means and explicit noise."""
    vae, scale = pipe.vae, pipe.vae.config.scaling_factor
    hard = (mask >= 0.5).float()
    image_latents = vae.encode(picture * 2 - 1).latent_dist.mean * scale
    latent_mask = torch.nn.functional.interpolate(hard, size=image_latents.shape[-2:])
    masked_latents = vae.encode((picture * 2 - 1) * (hard < 0.5)).latent_dist.mean * scale
    n = len(noise)
    context = _context(pipe, n)
    scheduler.set_timesteps(steps)
    run = int(steps * strength)
    timesteps = scheduler.timesteps[steps - run:]
    if strength == 1:
        x = noise * scheduler.init_noise_sigma
        if not nine_channel:
            # One deliberate difference: diffusers' first step sees pure noise outside the mask too;
            # stablekit (like the web UI) starts the kept region on the original's trajectory.
            kept = scheduler.add_noise(image_latents.expand(n, -1, -1, -1), noise, timesteps[:1])
            x = latent_mask * x + (1 - latent_mask) * kept
    else:
        x = scheduler.add_noise(image_latents.expand(n, -1, -1, -1), noise, timesteps[:1])
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        if nine_channel:
            extra = torch.cat([latent_mask, masked_latents], 1).expand(2 * n, -1, -1, -1)
            x_in = torch.cat([x_in, extra], 1)
        uncond, cond = pipe.unet(x_in, t, encoder_hidden_states=context).sample.chunk(2)
        x = scheduler.step(uncond + cfg * (cond - uncond), t, x).prev_sample
        if not nine_channel:  # 4-channel path: outside the mask, the original noised to the next step
            proper = image_latents
            if i < len(timesteps) - 1:
                proper = scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
            x = (1 - latent_mask) * proper + latent_mask * x
    pictures = vae.decode(x / scale).sample
    return (pictures / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd1-inpaint"])
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpaint_matches_diffusers_step_by_step(tiny_models, family, strength):
    tiny = tiny_models[family]
    engine = stablekit.load(tiny.single_file)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny.diffusers_dir, safety_checker=None)
    image, mask = make_picture(), make_mask()
    noise = torch.randn((2, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(5))
    ours, _ = engine.inpaint_tensor(image, mask, params(sampler="DDIM", denoising_strength=strength), noise=noise)
    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    ref = reference_inpaint(pipe, scheduler, to_tensor(image), to_tensor(mask)[:, :1], noise, 8, strength, 7.0,
                            nine_channel=family == "sd1-inpaint")
    err = (ours - ref).abs().max().item()
    method = "model" if family == "sd1-inpaint" else "blend"
    print(f"\n[parity] {tiny.name} inpaint ({method}) strength {strength}: max abs difference {err:.2e}")
    assert err < 5e-4 and ref.std() > 0.05


def test_paste_back_keeps_unmasked_pixels_byte_identical_and_changes_the_masked_region(tiny_models):
    engine = stablekit.load(tiny_models["sd1"].single_file)
    image, mask = make_picture(), make_mask()
    out = engine.inpaint(image, mask, params(mask_blur=4.0, paste_back=True, batch_size=1, sampler="Euler a"))[0]
    original, result = np.asarray(image), np.asarray(out)
    soft = gaussian_blur(mask_from_picture(mask), 4.0)[0, 0].numpy()
    assert (soft == 0).sum() > 1000
    assert np.array_equal(result[soft == 0], original[soft == 0])
    inside = mask_from_picture(mask)[0, 0].numpy() == 1
    assert np.abs(result[inside].astype(int) - original[inside].astype(int)).mean() > 10
    info = out.info["parameters"]
    assert "Denoising strength: 0.75" in info and "Mask blur: 4" in info and "Masked content: original" in info


def test_without_paste_back_the_vae_round_trip_shows(tiny_models):
    engine = stablekit.load(tiny_models["sd1"].single_file)
    image, mask = make_picture(), make_mask()
    out, _ = engine.inpaint_tensor(image, mask, params(batch_size=1, paste_back=False))
    outside = mask_from_picture(mask)[0, 0] == 0
    assert (out[0][:, outside] - to_tensor(image)[0][:, outside]).abs().max() > 1 / 255


def test_masked_content_changes_the_start(tiny_models):
    engine = stablekit.load(tiny_models["sd1"].single_file)
    image, mask = make_picture(), make_mask()
    runs = {c: engine.inpaint_tensor(image, mask, params(masked_content=c, denoising_strength=0.6, batch_size=1))[0]
            for c in ("original", "fill", "latent-noise", "latent-nothing")}
    inside = mask_from_picture(mask)[0, 0] == 1
    for c in ("fill", "latent-noise", "latent-nothing"):
        assert (runs[c][0][:, inside] - runs["original"][0][:, inside]).abs().mean() > 1e-3, c


def test_latent_noise_forgets_the_masked_content(tiny_models):
    """With latent noise, two pictures that differ only inside the mask give nearly the same result there."""
    engine = stablekit.load(tiny_models["sd1"].single_file)
    mask = make_mask()
    a = make_picture()
    b = a.copy()
    b.paste((255, 0, 255), (28, 20, 60, 44))  # a magenta block well inside the mask
    inside = mask_from_picture(mask)[0, 0] == 1

    def gap(content):
        pa = engine.inpaint_tensor(a, mask, params(masked_content=content, denoising_strength=0.5, batch_size=1))[0]
        pb = engine.inpaint_tensor(b, mask, params(masked_content=content, denoising_strength=0.5, batch_size=1))[0]
        return (pa[0][:, inside] - pb[0][:, inside]).abs().mean().item()

    assert gap("latent-noise") < 0.3 * gap("original")


def test_mask_formats_agree():
    mask = make_mask()
    grey = mask_from_picture(mask)
    rgb = mask_from_picture(mask.convert("RGB"))
    rgba = Image.new("RGBA", mask.size, (0, 0, 0, 255))
    rgba.putalpha(Image.eval(mask, lambda v: 255 - v))  # transparent where the mask is white
    assert torch.equal(grey, rgb) and torch.equal(grey, mask_from_picture(rgba))
    assert torch.equal(mask_from_picture(mask, invert=True), 1 - grey)


def test_mismatched_mask_size_is_a_clear_error_unless_resized(tiny_models):
    engine = stablekit.load(tiny_models["sd1"].single_file)
    with pytest.raises(ValueError, match=r"mask is 48x32 but the picture is 96x64"):
        engine.inpaint_tensor(make_picture(), make_mask(48, 32), params())
    out, _ = engine.inpaint_tensor(make_picture(), make_mask(48, 32), params(batch_size=1, steps=2), resize_mask=True)
    assert out.shape == (1, 3, H, W)


def test_model_method_needs_an_inpainting_model(tiny_models):
    engine = stablekit.load(tiny_models["sd1"].single_file)
    with pytest.raises(ValueError, match="needs a 9-channel inpainting checkpoint"):
        engine.inpaint_tensor(make_picture(), make_mask(), params(inpaint_method="model"))


def test_cli_inpaint(tiny_models, tmp_path, capsys):
    from stablekit.cli import main

    make_picture().save(tmp_path / "in.png")
    make_mask().save(tmp_path / "mask.png")
    model = str(tiny_models["sd1-inpaint"].single_file)
    args = ["inpaint", "--model", model, "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
            "--prompt", "a star", "--steps", "3", "--seed", "2", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    (path,) = capsys.readouterr().out.split()
    with Image.open(path) as im:
        info = im.info["parameters"]
        assert im.size == (W, H) and "Conditional mask weight: 1" in info and "Denoising strength: 1" in info
    make_mask(48, 32).save(tmp_path / "small.png")
    assert main(args[:6] + [str(tmp_path / "small.png")] + args[7:]) == 2
    assert "mask is 48x32 but the picture is 96x64" in capsys.readouterr().err
