"""`stablekit train lora`: the branches learn, the file is kohya's and loads here and in diffusers with
the same effect, resuming equals running through."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from stablekit.addons.lora import LoraPatcher, read_lora
from stablekit.checkpoint import load_model
from stablekit.cli import main
from stablekit.diffusion.cond import Cond
from stablekit.diffusion.schedule import ModelSchedule
from stablekit.models.tokenizer import CLIPTokenizer
from stablekit.train.lora import diffusers_unet_name, train_lora

from .test_lora import assert_matches_reference, inputs, pipe_for, run_ours

diffusers = pytest.importorskip("diffusers")


def _data(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, colour in enumerate([(220, 30, 30), (30, 60, 220), (240, 210, 40)]):
        arr = np.full((64, 64, 3), colour, np.uint8)
        arr[16:48, 16:48] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"zorp picture {i}")
    return folder


@torch.no_grad()
def _loss(model, folder) -> float:
    """The training objective on fixed pictures, timesteps and noise (so before/after compare)."""
    from stablekit.images import load_picture, to_tensor

    g = torch.Generator().manual_seed(3)
    pics = torch.cat([to_tensor(load_picture(folder / f"p{i}.png")) for i in range(3)])
    x0 = model.vae.encode(pics * 2 - 1)[0] * model.vae.cfg.scale_factor
    alphas = ModelSchedule(model.cfg.schedule).alphas_cumprod.float()
    total = 0.0
    for _ in range(8):
        t = torch.randint(0, 1000, (3,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        ctx = model.text_encoder(CLIPTokenizer(pad_id=model.cfg.text.pad_id)([f"zorp picture {i}" for i in range(3)]))
        total += torch.nn.functional.mse_loss(model.unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.float(), Cond(ctx)),
                                              eps).item()
    return total / 8


def test_a_trained_lora_lowers_the_loss_and_loads_here_and_in_diffusers(tiny_models, tmp_path, capsys):
    tiny = tiny_models["sd1"]
    data = _data(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "lora", "--model", str(tiny.single_file), "--data", str(data), "--out", str(out),
                 "--steps", "60", "--size", "64", "--lr", "3e-3", "--rank", "4", "--alpha", "2", "--text-encoder",
                 "--device", "cpu", "--name", "zorp", "--peft"]) == 0
    path = out / "zorp.safetensors"
    assert capsys.readouterr().out.strip() == str(path)
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_output_name"] == "zorp"
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)

    model = load_model(tiny.single_file).model
    before = _loss(model, data)
    lora = read_lora(path)
    base = run_ours(model, *inputs(tiny))
    LoraPatcher(model).apply([(lora, 1.0, 1.0)])  # every module of the file resolves (unknown names raise)
    after = _loss(model, data)
    print(f"\n[train lora] fixed-batch loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before

    for name in (path.name, "pytorch_lora_weights.safetensors"):  # the kohya file and the diffusers/PEFT copy
        pipe = pipe_for(tiny)
        pipe.load_lora_weights(str(out), weight_name=name)
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
        assert_matches_reference(tiny, model, pipe, base, f"trained {name}")
    peft = read_lora(out / "pytorch_lora_weights.safetensors")  # and this project reads the copy alike
    assert {m.scale for m in peft.modules.values()} == {0.5} and len(peft.modules) == len(lora.modules)


def test_resuming_a_stopped_run_equals_running_through(tiny_models, tmp_path):
    tiny = tiny_models["sd1"]
    data = _data(tmp_path / "data")
    kw = dict(steps=6, batch_size=2, lr=1e-3, rank=2, size=64, device="cpu")
    straight = train_lora(tiny.single_file, data, tmp_path / "a", **kw)
    assert train_lora(tiny.single_file, data, tmp_path / "b", stop_after=3, **kw) is None
    resumed = train_lora(tiny.single_file, data, tmp_path / "b", **kw)
    with safe_open(str(straight), "pt") as f, safe_open(str(resumed), "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())


def test_lora_names_follow_diffusers_blocks_and_bad_settings_are_clear(tiny_models, tmp_path, capsys):
    assert diffusers_unet_name("input_blocks.4.1.proj_in", 2) == "down_blocks.1.attentions.0.proj_in"
    assert diffusers_unet_name("input_blocks.5.1.proj_in", 2) == "down_blocks.1.attentions.1.proj_in"
    assert diffusers_unet_name("output_blocks.5.1.proj_out", 2) == "up_blocks.1.attentions.2.proj_out"
    assert diffusers_unet_name("middle_block.1.transformer_blocks.0.attn1.to_q", 2) == \
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    data = _data(tmp_path / "data")
    base = ["train", "lora", "--model", str(tiny_models["sd2"].single_file), "--data", str(data),
            "--out", str(tmp_path / "o"), "--steps", "1", "--size", "64", "--device", "cpu"]
    assert main(base + ["--rank", "0"]) == 2 and "--rank must be at least 1" in capsys.readouterr().err
    assert main(base + ["--text-encoder"]) == 2 and "SD 1.x text encoders" in capsys.readouterr().err


def test_flips_caption_dropout_ema_and_the_loss_plot(tiny_models, tmp_path, capsys):
    from stablekit.train.data import captioned_batches

    tiny = tiny_models["sd1"]
    data = _data(tmp_path / "data")
    model = load_model(tiny.single_file).model
    pairs = [(data / f"p{i}.png", f"c{i}") for i in range(3)]
    plain = captioned_batches(pairs, model.vae, 64, 8, 0, torch.device("cpu"))(0)[0]
    flipped = captioned_batches(pairs, model.vae, 64, 8, 0, torch.device("cpu"), flip=True)(0)[0]
    assert not torch.equal(plain, flipped)  # some of the 8 draws are mirrored pictures' latents
    out = tmp_path / "run"
    args = ["train", "lora", "--model", str(tiny.single_file), "--data", str(data), "--out", str(out), "--steps",
            "30", "--size", "64", "--device", "cpu", "--flip", "--caption-dropout", "0.2", "--ema", "0.9"]
    assert main(args) == 0
    assert (out / f"{out.name}.safetensors").is_file()
    assert Image.open(out / "diffusion-loss.png").size == (640, 320)
    assert main(args[:-2] + ["--ema", "1.5"]) == 2 and "--ema must be at least 0" in capsys.readouterr().err


def test_gradient_checkpointing_changes_nothing_and_bf16_autocast_trains(tiny_models, tmp_path):
    tiny = tiny_models["sd1"]
    data = _data(tmp_path / "data")
    kw = dict(steps=3, batch_size=2, lr=1e-3, rank=2, size=64, device="cpu")
    plain = train_lora(tiny.single_file, data, tmp_path / "a", **kw)
    recomputed = train_lora(tiny.single_file, data, tmp_path / "b", gradient_checkpointing=True, **kw)
    bf16 = train_lora(tiny.single_file, data, tmp_path / "c", autocast=torch.bfloat16, **kw)
    with safe_open(str(plain), "pt") as f, safe_open(str(recomputed), "pt") as g, safe_open(str(bf16), "pt") as h:
        ups = [k for k in f.keys() if k.endswith("lora_up.weight")]
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
        moved = [h.get_tensor(k).float() for k in ups]
        assert all(torch.isfinite(t).all() for t in moved) and any(t.abs().max() > 0 for t in moved)
        assert any(not torch.equal(f.get_tensor(k), h.get_tensor(k)) for k in ups)  # bf16 did run


def test_aspect_ratio_buckets_batch_pictures_of_one_shape(tiny_models, tmp_path):
    from stablekit.train.data import bucket_sizes, captioned_batches, nearest_bucket

    assert (512, 512) in bucket_sizes(512) and (768, 320) in bucket_sizes(512) and (320, 768) in bucket_sizes(512)
    assert nearest_bucket(1920, 1080, bucket_sizes(512)) == (640, 384)  # 16:9 -> 5:3, about 512 x 512 pixels
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, (w, h) in enumerate([(128, 64), (130, 62), (64, 128), (64, 64)]):
        Image.new("RGB", (w, h), (40 * i, 90, 200)).save(folder / f"m{i}.png")
    pairs = [(folder / f"m{i}.png", f"c{i}") for i in range(4)]
    vae = load_model(tiny_models["sd1"].single_file).model.vae
    take = captioned_batches(pairs, vae, 64, 2, 0, torch.device("cpu"), buckets=True)
    shapes = {tuple(take(step)[0].shape[-2:]) for step in range(30)}
    wide, tall = nearest_bucket(128, 64, bucket_sizes(64)), nearest_bucket(64, 128, bucket_sizes(64))
    assert shapes == {(wide[1] // 8, wide[0] // 8), (tall[1] // 8, tall[0] // 8), (8, 8)}
    assert all(len({tuple(t.shape) for t in take(s)[0]}) == 1 for s in range(5))


def test_locon_trains_the_resblocks_and_diffusers_loads_it_alike(tiny_models, tmp_path):
    """--conv-rank: kohya's conv_dim targets (ResnetBlock2D, Downsample2D, Upsample2D); the 3x3 convs at the
    conv rank. diffusers' loader must place every module where ours does, or the outputs differ."""
    tiny = tiny_models["sd1"]
    data = _data(tmp_path / "data")
    out = tmp_path / "locon"
    assert main(["train", "lora", "--model", str(tiny.single_file), "--data", str(data), "--out", str(out),
                 "--steps", "20", "--size", "64", "--lr", "3e-3", "--rank", "4", "--conv-rank", "2",
                 "--conv-alpha", "1", "--text-encoder", "--device", "cpu", "--name", "locon"]) == 0
    path = out / "locon.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight").shape[:2] == (2, 32)
        assert json.loads(f.metadata()["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    for part in ("resnets_0_conv1", "resnets_0_time_emb_proj", "downsamplers_0_conv", "upsamplers_0_conv",
                 "mid_block_resnets_1_conv2"):
        assert any(part in k for k in keys), part
    model = load_model(tiny.single_file).model
    base = run_ours(model, *inputs(tiny))
    LoraPatcher(model).apply([(read_lora(path), 1.0, 1.0)])
    pipe = pipe_for(tiny)
    pipe.load_lora_weights(str(out), weight_name=path.name)
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    assert_matches_reference(tiny, model, pipe, base, "trained LoCon file")
