"""`stablekit train dreambooth`: the prior-preservation loss, class pictures made by the model, both outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors import safe_open

import stablekit
from stablekit.addons.lora import read_lora
from stablekit.cli import main
from stablekit.train.dreambooth import make_class_pictures, prior_weights

from .test_train_lora import _data


def test_the_weighted_loss_is_dreamboths_instance_plus_weighted_prior_loss():
    """diffusers' train_dreambooth.py: chunk the prediction and target in two, loss = mse(instance) +
    prior_loss_weight * mse(prior). Ours is sum_i w_i * mse_i over the concatenated batch."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    p_inst, p_prior = pred.chunk(2)
    t_inst, t_prior = target.chunk(2)
    expected = F.mse_loss(p_inst, t_inst) + 0.7 * F.mse_loss(p_prior, t_prior)
    ours = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * prior_weights(3, 3, 0.7)).sum()
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    # without a class prompt the weights are the plain mean
    torch.testing.assert_close((F.mse_loss(p_inst, t_inst, reduction="none").mean(dim=(1, 2, 3))
                                * prior_weights(3, 0, 1.0)).sum(), F.mse_loss(p_inst, t_inst))


def test_class_pictures_are_topped_up_by_the_model_and_reused(tiny_models, tmp_path):
    folder = tmp_path / "class"
    first = make_class_pictures(tiny_models["sd1"].single_file, folder, "a picture", 3, 64, "cpu", steps=2)
    assert [p.name for p in first] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    stamp = first[0].stat().st_mtime_ns
    again = make_class_pictures(tiny_models["sd1"].single_file, folder, "a picture", 3, 64, "cpu", steps=2)
    assert again == first and first[0].stat().st_mtime_ns == stamp  # nothing made twice


def test_dreambooth_writes_a_checkpoint_or_a_lora_that_load(tiny_models, tmp_path, capsys):
    tiny = tiny_models["sd1"]
    data = _data(tmp_path / "instance")
    common = ["train", "dreambooth", "--model", str(tiny.single_file), "--instance-data", str(data),
              "--instance-prompt", "a photo of sks thing", "--class-prompt", "a photo of thing",
              "--num-class-images", "2", "--steps", "3", "--size", "64", "--device", "cpu"]
    assert main(common + ["--out", str(tmp_path / "full"), "--lr", "1e-4"]) == 0
    full = tmp_path / "full" / "dreambooth.safetensors"
    assert capsys.readouterr().out.strip() == str(full)
    assert len(list((tmp_path / "full" / "class-pictures").glob("*.png"))) == 2
    assert stablekit.load(full).config == stablekit.load(tiny.single_file).config
    assert main(common + ["--out", str(tmp_path / "lora"), "--lora", "--rank", "2"]) == 0
    lora_path = tmp_path / "lora" / "dreambooth.safetensors"
    with safe_open(str(lora_path), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "2"
    assert read_lora(lora_path).kinds == ["lora"]
    assert main(common[:-2] + ["--device", "cpu", "--out", str(tmp_path / "x"), "--prior-loss-weight", "-1"]) == 2
    assert "--prior-loss-weight must be at least 0" in capsys.readouterr().err
