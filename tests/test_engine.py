"""Engine behaviour: both load paths agree, seeds and batches, dtypes, infotext, the CLI."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image

import stablekit
from stablekit.checkpoint import load_model
from stablekit.cli import main
from stablekit.diffusion.samplers import SAMPLERS
from stablekit.images import infotext

W, H = 96, 64


@pytest.fixture(scope="module")
def sd1(tiny_models):
    return stablekit.load(tiny_models["sd1"].single_file)


def params(**fields) -> stablekit.GenerationParams:
    base = dict(prompt="a red circle", negative_prompt="blurry", width=W, height=H, steps=5, seed=1)
    return stablekit.GenerationParams(**{**base, **fields})


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_and_diffusers_folder_load_identically(tiny_models, family):
    tiny = tiny_models[family]
    a = load_model(tiny.single_file)
    b = load_model(tiny.diffusers_dir)
    # Only the folder says its training size (unet sample_size 8 -> 64 px); the bare file gets the SD default.
    assert (a.config.resolution, b.config.resolution) == (512, 64)
    assert a.config == replace(b.config, resolution=512)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ea, eb = stablekit.Engine(a, torch.device("cpu"), torch.float32), stablekit.Engine(b, torch.device("cpu"), torch.float32)
    assert torch.equal(ea.txt2img_tensor(params())[0], eb.txt2img_tensor(params())[0])


def test_ckpt_file_loads_like_safetensors(tiny_models, tmp_path):
    """A training-style .ckpt ({"state_dict": ..., "global_step": ...}) through weights_only loading."""
    from safetensors.torch import load_file

    tiny = tiny_models["sd1"]
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(tiny.single_file), "global_step": 470000}, ckpt)
    a, b = load_model(tiny.single_file), load_model(ckpt)
    assert a.config == b.config
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("sampler", [s.name for s in SAMPLERS])
def test_batch_image_equals_single_run_with_its_seed(sd1, sampler):
    eta = {"DDIM": 1.0}.get(sampler)  # stochastic DDIM too
    batch, _ = sd1.txt2img_tensor(params(sampler=sampler, seed=40, batch_size=3, eta=eta))
    for i in range(3):
        single, _ = sd1.txt2img_tensor(params(sampler=sampler, seed=40 + i, eta=eta))
        torch.testing.assert_close(batch[i : i + 1], single, atol=1e-4, rtol=0)  # batched kernels sum in another order


@pytest.mark.parametrize("cfg_scale, unet_batch", [(1.0, 1), (7.0, 2)])
def test_cfg_batches_cond_and_uncond_and_skips_uncond_at_scale_one(sd1, cfg_scale, unet_batch):
    batches = []
    hook = sd1.loaded.model.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        sd1.txt2img_tensor(params(cfg_scale=cfg_scale, sampler="Euler", steps=3))
    finally:
        hook.remove()
    assert batches == [unet_batch] * 3  # one network call per step


def test_explicit_noise_equals_seeded_noise(sd1):
    noise = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(9))
    seeded, _ = sd1.txt2img_tensor(params(seed=9, sampler="Euler"))
    explicit, _ = sd1.txt2img_tensor(params(seed=123, sampler="Euler"), noise=noise)
    assert torch.equal(seeded, explicit)
    with pytest.raises(ValueError, match="explicit noise has shape"):
        sd1.txt2img_tensor(params(), noise=noise[:, :3])


def test_explicit_noise_reports_the_callers_seed_and_no_random_one(sd1):
    noise = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(9))
    a, p = sd1.txt2img_tensor(params(seed=-1, sampler="Euler a"), noise=noise)
    b, q = sd1.txt2img_tensor(params(seed=-1, sampler="Euler a"), noise=noise)
    assert p.seed == q.seed == 0 and torch.equal(a, b)  # the step noise's seed: the run repeats
    assert sd1.txt2img_tensor(params(seed=77, sampler="Euler a"), noise=noise)[1].seed == 77
    info = sd1.txt2img(params(seed=-1), noise=noise)[0].info["parameters"]
    assert "Seed: 0," in info and "Initial noise: given" in info


def test_different_seeds_and_prompts_change_the_picture(sd1):
    a, _ = sd1.txt2img_tensor(params(seed=1))
    assert not torch.equal(a, sd1.txt2img_tensor(params(seed=2))[0])
    assert not torch.equal(a, sd1.txt2img_tensor(params(prompt="a blue square"))[0])


def test_random_seed_is_reported(sd1):
    images = sd1.txt2img(params(seed=-1))
    assert "Seed: " in images[0].info["parameters"]
    seed = int(images[0].info["parameters"].split("Seed: ")[1].split(",")[0])
    assert 0 <= seed < 2**32


def test_bf16_on_cpu_stays_close_to_fp32(tiny_models, sd1):
    bf16 = stablekit.load(tiny_models["sd1"].single_file, dtype="bf16")
    assert next(bf16.loaded.model.unet.parameters()).dtype == torch.bfloat16
    a = sd1.txt2img_tensor(params(sampler="Euler"))[0]
    b = bf16.txt2img_tensor(params(sampler="Euler"))[0]
    assert b.dtype == torch.float32
    assert (a - b).abs().mean() < 0.05  # bf16 keeps 8 bits of mantissa: close, not equal


def test_infotext_format(sd1):
    image = sd1.txt2img(params(sampler="dpmpp_2m", cfg_scale=7.5, clip_skip=2, seed=5))[0]
    text = image.info["parameters"]
    lines = text.split("\n")
    assert lines[0] == "a red circle"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith(
        f"Steps: 5, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 5, Size: {W}x{H}, Model hash: "
    )
    assert f"Model: {sd1.loaded.name}" in lines[2] and "Clip skip: 2" in lines[2]
    assert len(sd1.loaded.short_hash) == 10


def test_infotext_eta_as_the_web_ui_writes_it(sd1):
    ddim = sd1.txt2img(params(sampler="DDIM", eta=0.5, steps=2))[0].info["parameters"]
    assert "Eta DDIM: 0.5" in ddim
    euler_a = sd1.txt2img(params(sampler="Euler a", eta=0.7, steps=2))[0].info["parameters"]
    assert "Eta: 0.7" in euler_a
    default = sd1.txt2img(params(sampler="Euler a", eta=1.0, steps=2))[0].info["parameters"]
    assert "Eta" not in default


def test_infotext_quotes_and_omits():
    text = infotext("p", "", {"A": 1, "B": None, "C": "x, y", "D": 7.0})
    assert text == 'p\nA: 1, C: "x, y", D: 7'


def test_cli_txt2img_writes_pngs_with_infotext_and_never_overwrites(tiny_models, tmp_path, capsys):
    args = ["txt2img", "--model", str(tiny_models["sd2"].single_file), "--prompt", "a cat", "--width", "96",
            "--height", "64", "--steps", "3", "--seed", "77", "--batch-size", "2", "--out", str(tmp_path),
            "--sampler", "Euler a"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert main(args) == 0
    second = capsys.readouterr()
    paths = first.out.split() + second.out.split()
    assert len(paths) == 4 and len(set(paths)) == 4
    assert [p.rsplit("-", 1)[1] for p in paths] == ["77.png", "78.png", "77.png", "78.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.size == (96, 64)
            assert "Sampler: Euler a, Schedule type: Uniform" in im.info["parameters"]
    with Image.open(paths[0]) as a, Image.open(paths[2]) as b:  # same seed, same picture
        assert a.tobytes() == b.tobytes()
    assert "prediction: v (tiny-sd2.yaml)" in first.err
    assert "sampling" in first.err  # the progress bar goes to stderr


def test_cli_info(tiny_models, capsys):
    assert main(["info", str(tiny_models["sd2"].single_file)]) == 0
    out = capsys.readouterr().out
    assert "family         sd2" in out and "prediction     v" in out and "float32" in out


def test_cli_entry_point_runs_as_module(tiny_models):
    proc = subprocess.run([sys.executable, "-m", "stablekit.cli", "info", str(tiny_models["sd1"].diffusers_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "variant        base" in proc.stdout


def test_cli_samplers_lists_every_sampler_with_aliases_and_schedules(capsys):
    from stablekit.diffusion.schedule_names import SCHEDULE_LABELS

    assert main(["samplers"]) == 0
    out = capsys.readouterr().out
    for spec in SAMPLERS:
        row = next(line for line in out.splitlines() if line.startswith(spec.name + " "))
        assert all(alias in row for alias in spec.aliases) and spec.default_schedule in row
    assert all(name in out for name in SCHEDULE_LABELS)
