"""Training: both stages run, export loads through the ordinary loader, resuming equals running through."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import stablekit
from stablekit.cli import main
from stablekit.train.demo import DEMO_CONFIG, Recipe, train_demo
from stablekit.train.common import StageConfig

TINY = Recipe(
    vae=StageConfig(steps=3, batch_size=4, lr=1e-3, warmup=1, log_every=1, save_every=2, sample_every=3, seed=1),
    pool=16,
    diffusion=StageConfig(steps=4, batch_size=4, lr=1e-3, warmup=1, ema=0.9, log_every=1, save_every=2,
                          sample_every=100, seed=2),
)


def test_demo_recipe_runs_and_exports_a_loadable_checkpoint(tmp_path):
    path = train_demo(tmp_path, TINY)
    assert path == tmp_path / "shapes-demo.safetensors"
    assert path.stat().st_size < 20 * 2**20  # fp16 weights: the shipped model must stay small
    engine = stablekit.load(path)
    cfg = engine.config
    assert (cfg.resolution, cfg.unet.norm_groups, cfg.vae.norm_groups) == (64, 8, 8)
    assert cfg.unet == DEMO_CONFIG.unet and cfg.text == DEMO_CONFIG.text
    pool_scale = float(torch.load(tmp_path / "pool.pt", weights_only=True)["scale"])
    assert cfg.vae.scale_factor == pytest.approx(pool_scale, rel=1e-5)
    assert any("shapes-demo.yaml" in note for note in engine.loaded.notes)
    (image,) = engine.txt2img(prompt="a red circle on a blue background", seed=3, steps=4)
    assert image.size == (64, 64)  # the model's own resolution when none is asked for
    log = (tmp_path / "diffusion-log.jsonl").read_text().splitlines()
    assert len(log) == 1 + TINY.diffusion.steps  # the config line, then one line per step here


def test_resuming_equals_running_through(tmp_path):
    through = tmp_path / "through"
    stopped = tmp_path / "stopped"
    assert train_demo(through, TINY) is not None
    half = replace(TINY, diffusion=replace(TINY.diffusion, stop_after=2))
    assert train_demo(stopped, half) is None  # stopped early: nothing exported yet
    assert not (stopped / "shapes-demo.safetensors").exists()
    assert train_demo(stopped, TINY) is not None  # the VAE is reused, the diffusion stage resumes at step 2
    a = load_file(str(through / "shapes-demo.safetensors"))
    b = load_file(str(stopped / "shapes-demo.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _captioned(folder, count=2):
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (80, 72), (40 * i, 120, 200)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"a picture number {i}")
    return folder


def test_finetune_changes_the_unet_and_keeps_the_rest(tiny_models, tmp_path, capsys):
    tiny = tiny_models["sd1"]
    data = _captioned(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "finetune", "--model", str(tiny.single_file), "--data", str(data), "--out", str(out),
            "--steps", "2", "--size", "64", "--lr", "1e-3", "--device", "cpu"]
    assert main(args) == 0
    result = out / "finetuned.safetensors"
    assert capsys.readouterr().out.strip() == str(result)
    before, after = load_file(str(tiny.single_file)), load_file(str(result))
    unet = [k for k in after if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(before[k], after[k]) for k in unet)
    assert all(torch.equal(before[k], after[k]) for k in after if not k.startswith("model.diffusion_model."))
    assert stablekit.load(result).config == stablekit.load(tiny.single_file).config


@pytest.mark.parametrize("problem", ["missing-folder", "no-caption", "empty"])
def test_finetune_bad_data_is_a_clear_error(tiny_models, tmp_path, capsys, problem):
    data = tmp_path / "data"
    if problem == "no-caption":
        _captioned(data)
        (data / "p1.txt").unlink()
    elif problem == "empty":
        data.mkdir()
    args = ["train", "finetune", "--model", str(tiny_models["sd1"].single_file), "--data", str(data),
            "--out", str(tmp_path / "run"), "--steps", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    expected = {"missing-folder": "not a folder", "no-caption": "p1.png has no caption file p1.txt",
                "empty": "no pictures"}[problem]
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize("args", [["demo", "--steps", "0"], ["demo", "--pool", "-5"],
                                  ["finetune", "--model", "m", "--data", "d", "--out", "o", "--lr", "0"],
                                  ["finetune", "--model", "m", "--data", "d", "--out", "o", "--batch-size", "0"]])
def test_train_rejects_out_of_range_numbers(args, tmp_path, capsys):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "must be" in err and "Traceback" not in err
