"""ControlNet: the files people download, parity with diffusers' ControlNet pipelines on the same
weights and noise, the extension's control-mode formulas and step window, and bad input.

The tiny ControlNets are made by diffusers (`ControlNetModel.from_unet` of each tiny model's UNet,
random weights) and saved as diffusers folders; the original-layout single files are written from
them and checked readable by diffusers' own single-file loader, so the two formats are tested
against an implementation outside this project.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import stablekit
from stablekit.addons.controlnet_files import load_controlnet, webui_model_hash
from stablekit.detect import CheckpointError
from stablekit.diffusion.cond import Cond
from stablekit.pipeline.control import ControlUnit, StepWindow, block_scales
from stablekit.pipeline.steps import StepClock


diffusers = pytest.importorskip("diffusers")

W, H = 96, 64
PROMPT = "a photograph of an astronaut riding a horse, highly detailed"
NEGATIVE = "blurry, low quality"
TOL = 5e-4  # max abs difference on [0, 1] pictures (the issue asks 2e-3)


def control_picture(seed: int, width: int = W, height: int = H) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (height, width, 3), dtype=np.uint8))


# --- files -----------------------------------------------------------------------------------------


def test_original_layout_file_is_what_diffusers_reads_from_the_folder(tiny_controlnets):
    net = tiny_controlnets["sd1"][0]
    ref = diffusers.ControlNetModel.from_pretrained(net.folder)
    single = diffusers.ControlNetModel.from_single_file(str(net.single), config=str(net.folder))
    for (name, a), (_, b) in zip(ref.state_dict().items(), single.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("source", ["folder", "single", "prefixed_fp16"])
def test_residuals_match_diffusers_controlnet(tiny_models, tiny_controlnets, family, source):
    engine = stablekit.load(tiny_models[family].single_file)
    net = tiny_controlnets[family][0]
    ours = load_controlnet(getattr(net, source), engine.config, engine.loaded.model.unet)
    ref = diffusers.ControlNetModel.from_pretrained(net.folder)
    g = torch.Generator().manual_seed(0)
    x, hint = torch.randn(2, 4, H // 8, W // 8, generator=g), torch.rand(2, 3, H, W, generator=g)
    context, t = torch.randn(2, 77, 128, generator=g), torch.tensor([999.0, 37.0])
    with torch.no_grad():
        mine = ours.net(x, hint, t, Cond(context))
        down, mid = ref(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    tol = 2e-2 if source == "prefixed_fp16" else 1e-4  # fp16 weights, rounded once
    assert len(mine) == len(down) + 1
    for a, b in zip(mine, [*down, mid]):
        assert b.abs().max() > 0.1
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_label_uses_the_web_ui_model_hash(tiny_controlnets, tiny_models):
    engine = stablekit.load(tiny_models["sd1"].single_file, controlnet_dir=tiny_controlnets["sd1"][0].single.parent)
    loaded = engine.controlnet("CONTROL_SD1_0")  # a name in the folder, any case
    assert loaded.label == f"control_sd1_0 [{webui_model_hash(tiny_controlnets['sd1'][0].single)}]"
    assert engine.controlnet(loaded.label) is loaded  # "name [hash]" finds it too, loaded once
    assert loaded.label in engine.controlnet_names()


def test_a_controlnet_for_sd2_on_an_sd1_model_is_a_clear_error(tiny_models, tiny_controlnets):
    engine = stablekit.load(tiny_models["sd1"].single_file)
    with pytest.raises(CheckpointError, match="the model is"):
        engine.controlnet(str(tiny_controlnets["sd2"][0].single))


def test_a_file_that_is_not_a_controlnet_is_refused(tiny_models, tmp_path):
    engine = stablekit.load(tiny_models["sd1"].single_file)
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        engine.controlnet(str(tiny_models["sd1"].single_file))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        engine.controlnet(str(bad))
    with pytest.raises(CheckpointError, match="unknown ControlNet"):
        stablekit.load(tiny_models["sd1"].single_file, controlnet_dir=tmp_path).controlnet("nothing_here")


# --- parity with diffusers' pipelines --------------------------------------------------------------


def _pipeline(cls, tiny, controlnet):
    base = diffusers.StableDiffusionPipeline.from_pretrained(tiny.diffusers_dir, safety_checker=None)
    pipe = cls(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
               controlnet=controlnet, scheduler=diffusers.DDIMScheduler.from_config(base.scheduler.config),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _compare(ours: torch.Tensor, ref: torch.Tensor, label: str) -> None:
    err = (ours - ref).abs().max().item()
    print(f"\n[parity] {label}: max abs difference {err:.2e}")
    assert ours.shape == ref.shape and err < TOL
    assert ref.std() > 0.05


def _units(nets, pictures, scales, start=0.0, end=1.0, guess=False):
    return tuple(ControlUnit(str(n.single), image=pic, weight=s, start=start, end=end, resize="just-resize",
                             guess_mode=guess, timing="diffusers") for n, pic, s in zip(nets, pictures, scales))


CASES = {  # name: (ControlNets used, their scales, start, end, guess mode)
    "single": (1, [1.0], 0.0, 1.0, False),
    "scale 0.6, window 0.25..0.75": (1, [0.6], 0.25, 0.75, False),
    "two ControlNets": (2, [1.0, 0.5], 0.0, 1.0, False),
    "guess mode": (1, [1.0], 0.0, 1.0, True),
}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("case", list(CASES))
def test_txt2img_matches_diffusers_controlnet_pipeline(tiny_models, tiny_controlnets, family, case):
    count, scales, start, end, guess = CASES[case]
    tiny, nets = tiny_models[family], tiny_controlnets[family][:count]
    pictures = [control_picture(k) for k in range(count)]
    models = [diffusers.ControlNetModel.from_pretrained(n.folder) for n in nets]
    pipe = _pipeline(diffusers.StableDiffusionControlNetPipeline, tiny, models if count > 1 else models[0])
    ref = pipe([PROMPT] * 2, negative_prompt=[NEGATIVE] * 2, image=pictures if count > 1 else pictures[0],
               height=H, width=W, num_inference_steps=8, guidance_scale=7.0, eta=0.0,
               generator=[torch.Generator().manual_seed(s) for s in (11, 12)], output_type="pt",
               controlnet_conditioning_scale=scales if count > 1 else scales[0],
               control_guidance_start=start, control_guidance_end=end, guess_mode=guess).images
    engine = stablekit.load(tiny.single_file)
    p = stablekit.GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=W, height=H, steps=8,
                                   cfg_scale=7.0, sampler="DDIM", seed=11, batch_size=2)
    ours, _ = engine.txt2img_tensor(p, controls=_units(nets, pictures, scales, start, end, guess))
    _compare(ours, ref, f"{family} ControlNet txt2img, {case}")
    plain, _ = engine.txt2img_tensor(p)
    assert (ours - plain).abs().max() > 0.01  # the ControlNet acted


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers' img2img pipelines sample the VAE posterior; stablekit takes its mean (see steps.encode_picture)."""
    from diffusers.models.autoencoders import vae as vae_module

    monkeypatch.setattr(vae_module.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def test_img2img_matches_diffusers_controlnet_img2img_pipeline(tiny_models, tiny_controlnets, posterior_mean):
    tiny, net = tiny_models["sd1"], tiny_controlnets["sd1"][0]
    image, control = control_picture(5), control_picture(6)
    pipe = _pipeline(diffusers.StableDiffusionControlNetImg2ImgPipeline, tiny,
                     diffusers.ControlNetModel.from_pretrained(net.folder))
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, image=image, control_image=control, strength=0.6, height=H,
               width=W, num_inference_steps=10, guidance_scale=6.0, eta=0.0,
               generator=torch.Generator().manual_seed(4), output_type="pt", controlnet_conditioning_scale=0.8,
               control_guidance_end=0.8).images
    engine = stablekit.load(tiny.single_file)
    p = stablekit.GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=W, height=H, steps=10,
                                   cfg_scale=6.0, sampler="DDIM", seed=4, denoising_strength=0.6)
    ours, _ = engine.img2img_tensor(image, p, controls=_units([net], [control], [0.8], end=0.8))
    _compare(ours, ref, "sd1 ControlNet img2img, strength 0.6, scale 0.8, end 0.8")


@pytest.mark.parametrize("family", ["sd1", "sd1-inpaint"])
def test_inpaint_matches_diffusers_controlnet_inpaint_pipeline(tiny_models, tiny_controlnets, family, posterior_mean):
    tiny, net = tiny_models[family], tiny_controlnets["sd1"][0]  # a 4-channel ControlNet on either UNet
    image, control = control_picture(7), control_picture(8)
    mask = Image.new("L", (W, H), 0)
    mask.paste(255, (24, 16, 72, 48))
    pipe = _pipeline(diffusers.StableDiffusionControlNetInpaintPipeline, tiny,
                     diffusers.ControlNetModel.from_pretrained(net.folder))
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, image=image, mask_image=mask, control_image=control, strength=0.75,
               height=H, width=W, num_inference_steps=8, guidance_scale=7.0, eta=0.0,
               generator=torch.Generator().manual_seed(9), output_type="pt",
               controlnet_conditioning_scale=0.5).images  # the inpaint pipeline's default, given to be plain
    engine = stablekit.load(tiny.single_file)
    p = stablekit.GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=W, height=H, steps=8,
                                   cfg_scale=7.0, sampler="DDIM", seed=9, denoising_strength=0.75, mask_blur=0,
                                   paste_back=False)
    ours, _ = engine.inpaint_tensor(image, mask, p, controls=_units([net], [control], [0.5]))
    _compare(ours, ref, f"{family} ControlNet inpaint, strength 0.75")


# --- the extension's formulas ----------------------------------------------------------------------


def test_control_mode_scales_are_the_extensions():
    unit = ControlUnit("m", weight=0.8)
    assert torch.allclose(block_scales(unit, 13), torch.full((13,), 0.8))
    for mode in ("prompt", "control"):
        soft = block_scales(ControlUnit("m", weight=0.8, mode=mode), 13)
        assert torch.allclose(soft, torch.tensor([0.8 * 0.825 ** (12 - i) for i in range(13)]))
    guess = block_scales(ControlUnit("m", weight=0.8, guess_mode=True), 13)
    assert torch.allclose(guess, 0.8 * torch.logspace(-1, 0, 13))


@pytest.mark.parametrize("timing, start, end, steps, active", [
    # The web UI: step i sees the last reported step (i - 1, and 0 for the first): start <= s / N <= end.
    ("webui", 0.0, 0.5, 10, [True] * 7 + [False] * 3),
    ("webui", 0.3, 1.0, 10, [False] * 4 + [True] * 6),
    # diffusers: i / N >= start and (i + 1) / N <= end.
    ("diffusers", 0.0, 0.5, 10, [True] * 5 + [False] * 5),
    ("diffusers", 0.3, 1.0, 10, [False] * 3 + [True] * 7),
])
def test_step_window(timing, start, end, steps, active):
    clock = StepClock(steps)
    window = StepWindow(start, end, timing, clock)
    seen = []
    for i in range(steps):
        seen.append(window())
        clock.reported = i  # the sampler's callback at the end of step i
    assert seen == active


def test_control_mode_control_leaves_the_negative_prompt_alone(tiny_models, tiny_controlnets):
    """'ControlNet is more important': residuals reach only the prompt's half (cfg injection). With CFG 1
    (the prompt's half only) it equals the soft 'My prompt is more important' mode."""
    engine = stablekit.load(tiny_models["sd1"].single_file)
    net, picture = tiny_controlnets["sd1"][0], control_picture(3)
    p = stablekit.GenerationParams(prompt=PROMPT, width=W, height=H, steps=4, sampler="Euler", seed=2, cfg_scale=1.0)
    outs = {mode: engine.txt2img_tensor(p, controls=(ControlUnit(str(net.single), image=picture, mode=mode),))[0]
            for mode in ("prompt", "control", "balanced")}
    assert torch.allclose(outs["prompt"], outs["control"], atol=1e-6)
    assert (outs["balanced"] - outs["prompt"]).abs().max() > 1e-3
    guided = p.__class__(**{**p.__dict__, "cfg_scale": 7.0})
    a = engine.txt2img_tensor(guided, controls=(ControlUnit(str(net.single), image=picture, mode="prompt"),))[0]
    b = engine.txt2img_tensor(guided, controls=(ControlUnit(str(net.single), image=picture, mode="control"),))[0]
    assert (a - b).abs().max() > 1e-3


def test_infotext_names_the_unit_as_the_extension_does(tiny_models, tiny_controlnets):
    engine = stablekit.load(tiny_models["sd1"].single_file, controlnet_dir=tiny_controlnets["sd1"][0].single.parent)
    unit = ControlUnit("control_sd1_0", image=control_picture(1), module="canny", weight=0.5)
    image = engine.txt2img(prompt="x", width=W, height=H, steps=2, controls=(unit,))[0]
    label = engine.controlnet("control_sd1_0").label
    text = image.info["parameters"]
    assert (f'ControlNet 0: "Module: canny, Model: {label}, Weight: 0.5, Resize Mode: Crop and Resize, '
            'Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0, '
            'Pixel Perfect: False, Control Mode: Balanced"') in text


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    (dict(weight=2.5), "weight must be in 0..2"),
    (dict(weight=-0.1), "weight must be in 0..2"),
    (dict(start=0.6, end=0.4), "start <= end"),
    (dict(mode="loud"), "unknown control mode"),
    (dict(resize="stretch"), "unknown control resize"),
    (dict(module="no-such-module"), "unknown preprocessor"),
    (dict(guess_mode=True, mode="control"), "guess mode"),
])
def test_bad_units_are_clear_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        ControlUnit("m", **fields).validated()


def test_a_unit_without_a_picture_on_txt2img_is_a_clear_error(tiny_models, tiny_controlnets):
    engine = stablekit.load(tiny_models["sd1"].single_file)
    with pytest.raises(ValueError, match="has no picture"):
        engine.txt2img(prompt="x", width=W, height=H, steps=2, controls=(ControlUnit(str(tiny_controlnets["sd1"][0].single)),))


# --- every task, the CLI, skipping -----------------------------------------------------------------


def test_control_end_skips_the_controlnet_after_its_window(tiny_models, tiny_controlnets):
    engine = stablekit.load(tiny_models["sd1"].single_file)
    net = tiny_controlnets["sd1"][0]
    loaded = engine.controlnet(str(net.single))
    calls = []
    handle = loaded.net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        p = stablekit.GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=W, height=H, steps=10,
                                       sampler="Euler", seed=1)
        engine.txt2img_tensor(p, controls=(ControlUnit(str(net.single), image=control_picture(2), end=0.5),))
    finally:
        handle.remove()
    assert calls == [2] * 7  # steps 0..6 (the web UI's rule), prompt and negative prompt as one batch


def test_hires_fix_runs_the_control_at_each_passs_size_and_follows_hr_option(tiny_models, tiny_controlnets):
    engine = stablekit.load(tiny_models["sd1"].single_file)
    net = tiny_controlnets["sd1"][0]
    sizes = []
    handle = engine.controlnet(str(net.single)).net.register_forward_hook(
        lambda module, args, out: sizes.append(tuple(args[1].shape[-2:])))
    p = stablekit.GenerationParams(prompt=PROMPT, width=W, height=H, steps=3, sampler="Euler", seed=1,
                                   hires_scale=1.5, hires_denoise=0.5, hires_steps=2)
    results = {}
    try:
        for option in ("both", "low", "high"):
            sizes.clear()
            unit = ControlUnit(str(net.single), image=control_picture(2), hr_option=option)
            results[option] = engine.txt2img_tensor(p, controls=(unit,))[0]
            expected = {"both": [(H, W)] * 3 + [(96, 144)] * 2, "low": [(H, W)] * 3, "high": [(96, 144)] * 2}
            assert sizes == expected[option]
    finally:
        handle.remove()
    assert results["both"].shape == (1, 3, 96, 144)
    assert (results["low"] - results["high"]).abs().max() > 1e-3


def test_canny_is_softened_in_the_hires_pass():
    from stablekit.pipeline.control import Control, control_inputs

    class Net:  # what control_inputs reads of a loaded ControlNet
        net = type("N", (), {"skip_channels": tuple(range(12))})()

    unit = ControlUnit("m", module="canny", weight=1.0)
    control = Control(unit, Net(), np.zeros((8, 8, 3), np.uint8))
    first, _ = control_inputs((control,), 8, 8, 1, StepClock(4), torch.device("cpu"))
    second, _ = control_inputs((control,), 8, 8, 1, StepClock(4), torch.device("cpu"), second_pass=True)
    assert torch.allclose(first[0].scales[0], torch.ones(13))
    assert torch.allclose(second[0].scales[0], block_scales(ControlUnit("m", mode="prompt"), 13))


def test_cli_control(tiny_models, tiny_controlnets, tmp_path, capsys):
    from stablekit.cli import main

    control = tmp_path / "control.png"
    control_picture(4).save(control)
    out = tmp_path / "out"
    args = ["txt2img", "--model", str(tiny_models["sd1"].single_file), "--prompt", "x", "--width", str(W),
            "--height", str(H), "--steps", "2", "--seed", "3", "--out", str(out), "--control-end", "0.5",
            "--control", f"{tiny_controlnets['sd1'][0].single}:{control}:0.7", "--control-module", "invert"]
    assert main(args) == 0
    text = Image.open(capsys.readouterr().out.strip().splitlines()[-1]).info["parameters"]
    assert "Module: invert" in text and "Weight: 0.7" in text and "Guidance End: 0.5" in text
    assert main([*args[:-4], "--control", f"{tiny_controlnets['sd2'][0].single}:{control}"]) == 2
    assert "is a ControlNet for" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # an argument error: argparse's usage line and exit status 2
        main([*args[:-4], "--control", "just-a-name"])
    assert stop.value.code == 2 and "MODEL:IMAGE" in capsys.readouterr().err


def test_only_masked_inpainting_crops_the_control_map_with_the_picture(tiny_models, tiny_controlnets):
    """--inpaint-area masked works on a box of the picture; the unit's map is cut to the same box, so a map
    that is the picture itself gives the same result as handing the ControlNet the box's crop."""
    engine = stablekit.load(tiny_models["sd1"].single_file)
    net = str(tiny_controlnets["sd1"][0].single)
    image, control = control_picture(11, 128, 96), control_picture(12, 128, 96)
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (40, 30, 70, 60))
    p = stablekit.GenerationParams(prompt=PROMPT, width=W, height=H, steps=3, sampler="Euler", seed=5,
                                   inpaint_area="masked", inpaint_padding=8, mask_blur=0, denoising_strength=1.0)
    ours = engine.inpaint(image, mask, p, controls=(ControlUnit(net, image=control, resize="just-resize"),))[0]
    plain = engine.inpaint(image, mask, p)[0]
    assert ours.size == image.size
    a, b = np.asarray(ours).astype(int), np.asarray(plain).astype(int)
    assert np.array_equal(a[:20], b[:20])  # outside the box both keep the picture
    assert np.abs(a - b).max() > 3  # inside, the control acted
    from stablekit.masks import mask_box, mask_from_picture
    from stablekit.pipeline.control_maps import fit_control_map, to_hint

    left, top, right, bottom = mask_box(mask_from_picture(mask, False), 8, W, H)
    seen = []
    handle = engine.controlnet(net).net.register_forward_hook(lambda m, args, out: seen.append(args[1][:1].clone()))
    try:
        engine.inpaint(image, mask, p, controls=(ControlUnit(net, image=control, resize="just-resize"),))
    finally:
        handle.remove()
    expected = to_hint(fit_control_map(np.asarray(control)[top:bottom, left:right], W, H, "just-resize"))
    assert all(torch.equal(hint, expected) for hint in seen) and len(seen) == 3  # every step saw the box's map
