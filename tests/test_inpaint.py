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


# --- only masked, outpainting, soft inpainting --------------------------------------------------------


@pytest.mark.parametrize("box, padding, size, expected", [
    ((40, 30, 50, 40), 8, (64, 64), (32, 22, 58, 48)),  # padded on every side, already square
    ((40, 30, 50, 40), 0, (96, 48), (35, 30, 55, 40)),  # widened to 2:1 around the centre
    ((0, 0, 10, 10), 4, (64, 64), (0, 0, 14, 14)),  # at the corner: kept inside the picture
    ((90, 50, 100, 60), 0, (96, 64), (85, 50, 100, 60)),  # at the far border, widened to 3:2
    ((48, 30, 49, 31), 0, (64, 64), (48, 30, 49, 31)),  # one pixel
    ((0, 0, 100, 60), 32, (96, 64), (0, 0, 100, 60)),  # everything
])
def test_mask_box(box, padding, size, expected):
    from stablekit.masks import mask_box

    mask = torch.zeros(1, 1, 60, 100)
    left, top, right, bottom = box
    mask[..., top:bottom, left:right] = 1
    got = mask_box(mask > 0, padding, *size)
    assert got == expected
    l, t, r, b = got
    assert 0 <= l < r <= 100 and 0 <= t < b <= 60
    assert mask[..., t:b, l:r].sum() == mask.sum()  # the whole mask is inside the box


def test_only_masked_returns_the_picture_size_and_changes_only_the_box(tiny_models):
    engine = stablekit.load(tiny_models["sd1"].single_file)
    image = make_picture(160, 120)
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (100, 70, 130, 100))
    out = engine.inpaint(image, mask, params(inpaint_area="masked", inpaint_padding=8, mask_blur=2.0,
                                             paste_back=True, batch_size=1, steps=4))[0]
    assert out.size == image.size
    original, result = np.asarray(image).astype(int), np.asarray(out).astype(int)
    changed = np.abs(result - original).sum(-1) > 0
    rows, cols = np.nonzero(changed)
    assert changed.sum() > 100
    assert rows.min() >= 70 - 8 and rows.max() < 100 + 8 and cols.min() >= 100 - 8 and cols.max() < 130 + 8
    assert "Inpaint area: Only masked" in out.info["parameters"] and "Masked area padding: 8" in out.info["parameters"]


@pytest.mark.parametrize("sides", [(16, 0, 0, 0), (0, 13, 5, 0), (8, 8, 8, 8)])
def test_outpaint_canvas(sides):
    from stablekit.pipeline.editing import outpaint_canvas

    image = make_picture(50, 30)
    canvas, mask = outpaint_canvas(image, *sides)
    assert canvas.width % 8 == 0 and canvas.height % 8 == 0
    assert canvas.width >= 50 + sides[0] + sides[1] and canvas.height >= 30 + sides[2] + sides[3]
    m = np.asarray(mask)
    inside = m == 0
    assert inside.sum() == 50 * 30 and (m == 255).sum() == canvas.width * canvas.height - 50 * 30
    rows, cols = np.nonzero(inside)
    kept = np.asarray(canvas)[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert np.array_equal(kept, np.asarray(image))
    with pytest.raises(ValueError, match="positive"):
        outpaint_canvas(image, 0, 0, 0, 0)


def test_outpaint_keeps_the_picture_and_paints_the_border(tiny_models):
    engine = stablekit.load(tiny_models["sd1"].single_file)
    image = make_picture(64, 48)
    out = engine.outpaint(image, left=16, right=16, params=params(batch_size=1, steps=3, mask_blur=0.0,
                                                                    paste_back=True, denoising_strength=1.0))[0]
    assert out.size == (96, 48)
    assert np.array_equal(np.asarray(out)[:, 16:80], np.asarray(image))


@pytest.mark.parametrize("fill", ["noise", "edges"])
def test_outpaint_new_area_is_all_generated_so_no_fill_seam_shows(tiny_models, fill):
    """With the mask blurred (4 px), the new area still takes only generated pixels: the same as without
    paste-back there, while the picture's middle stays the input's."""
    engine = stablekit.load(tiny_models["sd1"].single_file)
    image = make_picture(64, 48)
    run = lambda paste: np.asarray(engine.outpaint(image, left=16, right=16, fill=fill, params=params(  # noqa: E731
        batch_size=1, steps=3, mask_blur=4.0, paste_back=paste, denoising_strength=1.0))[0]).astype(int)
    pasted, generated = run(True), run(False)
    assert np.array_equal(pasted[:, :16], generated[:, :16]) and np.array_equal(pasted[:, 80:], generated[:, 80:])
    assert np.array_equal(pasted[:, 32:64], np.asarray(image)[:, 16:48])  # beyond the blur: the input's pixels


def test_soft_inpainting_lets_each_pixel_join_when_the_schedule_reaches_its_strength():
    """Per pixel, soft inpainting with strength m equals img2img with strength m (exact denoiser, Euler)."""
    from stablekit.diffusion.denoiser import SoftMaskedDenoiser
    from stablekit.diffusion.k_samplers import sample_euler
    from stablekit.diffusion.schedule import ModelSchedule, make_sigmas

    from .test_samplers import exact_denoiser

    steps = 10
    full = make_sigmas(ModelSchedule(), "karras", steps)
    g = torch.Generator().manual_seed(0)
    original, noise = torch.randn(1, 4, 3, 8, generator=g).double(), torch.randn(1, 4, 3, 8, generator=g).double()
    strength = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 3, 1).expand(1, 1, 3, 8).double()  # one row per strength
    soft = SoftMaskedDenoiser(exact_denoiser, original, strength, full)
    out = sample_euler(soft, original + float(full[0]) * noise, full)
    assert torch.allclose(out[:, :, 0], original[:, :, 0], atol=1e-12)  # strength 0: untouched
    for row, m in ((1, 0.5), (2, 1.0)):
        k = steps - int(steps * m)  # img2img with strength m starts at full[k]
        expected = sample_euler(exact_denoiser, original + float(full[k]) * noise, full[k:])
        assert torch.allclose(out[:, :, row], expected[:, :, row], atol=1e-10)


def test_soft_inpainting_through_the_engine_keeps_strength_zero_pixels(tiny_models, tmp_path, capsys):
    from stablekit.cli import main

    engine = stablekit.load(tiny_models["sd1"].single_file)
    image = make_picture()
    ramp = np.tile(np.linspace(0, 255, W).astype(np.uint8), (H, 1))
    ramp[:, :24] = 0  # the left quarter keeps
    out = engine.inpaint(image, Image.fromarray(ramp), params(soft_inpainting=True, batch_size=1, steps=4,
                                                              paste_back=True, denoising_strength=1.0))[0]
    assert np.array_equal(np.asarray(out)[:, :20], np.asarray(image)[:, :20])
    assert "Soft inpainting: True" in out.info["parameters"]
    image.save(tmp_path / "in.png")
    assert main(["outpaint", "--model", str(tiny_models["sd1"].single_file), "--image", str(tmp_path / "in.png"),
                 "--right", "20", "--prompt", "x", "--steps", "2", "--out", str(tmp_path / "out")]) == 0
    (path,) = capsys.readouterr().out.split()
    with Image.open(path) as im:
        assert im.size == (120, 64)


def test_strength_zero_returns_the_picture_and_full_strength_latent_noise_ignores_the_hole(tiny_models):
    engine = stablekit.load(tiny_models["sd1"].single_file)
    mask = make_mask()
    a = make_picture()
    kept, _ = engine.inpaint_tensor(a, mask, params(denoising_strength=0.0, batch_size=1))
    assert torch.equal(kept, to_tensor(a))
    b = a.copy()
    b.paste((255, 0, 255), (28, 20, 60, 44))  # differs from a only inside the mask
    inside = mask_from_picture(mask)[0, 0] == 1
    run = dict(masked_content="latent-noise", denoising_strength=1.0, batch_size=1)
    pa = engine.inpaint_tensor(a, mask, params(**run))[0]
    pb = engine.inpaint_tensor(b, mask, params(**run))[0]
    input_gap = (to_tensor(a)[0][:, inside] - to_tensor(b)[0][:, inside]).abs().mean()
    output_gap = (pa[0][:, inside] - pb[0][:, inside]).abs().mean()
    assert output_gap < 0.1 * input_gap  # only the VAE's view across the mask edge can carry anything over
