"""The conditioning seams: one Cond value, the UNet's vector input and control residuals (against
diffusers' UNet2DConditionModel on the same weights), CFG as one batch or as separate calls, and
model kinds read off the UNet's input channels."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import stablekit
from stablekit.bench.diffusers_folder import ldm_yaml
from stablekit.cli import main
from stablekit.detect import CheckpointError, detect
from stablekit.diffusion.cond import Cond
from stablekit.diffusion.denoiser import CFGDenoiser
from stablekit.models.unet import DiffusionWrapper
from stablekit.pipeline.conditioning import encode_text

from .conftest import randomize, tiny_config

diffusers = pytest.importorskip("diffusers")


def _unet_pair(cfg):
    """Our UNet with random weights in the original layout, and diffusers' UNet from diffusers' own converter."""
    from diffusers.loaders import single_file_utils as su

    ours = DiffusionWrapper(cfg.unet)
    randomize(ours, seed=7)
    sd = {f"model.{k}": v for k, v in ours.state_dict().items()}
    conf = su.create_unet_diffusers_config_from_ldm(ldm_yaml(cfg), sd, image_size=64)
    ref = diffusers.UNet2DConditionModel(**conf)
    ref.load_state_dict(su.convert_ldm_unet_checkpoint(sd, conf), strict=True)
    return ours.diffusion_model.eval(), ref.eval(), sd


@pytest.mark.parametrize("vector", ["classes", "adm"])
def test_unet_vector_input_matches_diffusers(vector):
    base = tiny_config("sd1")
    extra = {"num_classes": 10} if vector == "classes" else {"adm_in_channels": 24}
    cfg = replace(base, unet=replace(base.unet, **extra))
    ours, ref, sd = _unet_pair(cfg)
    assert detect_unet_extra(sd) == extra  # detection reads it back from the weights
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    t = torch.tensor([900.0, 20.0])
    labels = torch.tensor([3, 7]) if vector == "classes" else torch.randn(2, 24, generator=g)
    with torch.no_grad():
        out = ours(x, t, Cond(ctx, vector=labels))
        want = ref(x, t, encoder_hidden_states=ctx, class_labels=labels).sample
        other = ours(x, t, Cond(ctx, vector=labels.flip(0)))
    assert out.abs().max() > 0.1
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    assert (out - other).abs().max() > 1e-3  # the vector reaches the output
    with pytest.raises(ValueError, match="vector input"):
        ours(x, t, Cond(ctx))


def detect_unet_extra(sd: dict) -> dict:
    from stablekit.detect import Hints, detect_unet

    unet = detect_unet(sd, Hints())
    return {k: v for k, v in (("num_classes", unet.num_classes), ("adm_in_channels", unet.adm_in_channels)) if v}


def test_control_residuals_are_added_as_diffusers_adds_them():
    cfg = tiny_config("sd1")
    ours, ref, _ = _unet_pair(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, cfg.unet.context_dim, generator=g)
    t = torch.tensor([500.0])
    shapes = []  # the skip connections' shapes, then the middle block's
    hooks = [b.register_forward_hook(lambda m, a, out: shapes.append(out.shape))
             for b in [*ours.input_blocks, ours.middle_block]]
    with torch.no_grad():
        plain = ours(x, t, Cond(ctx))
    for h in hooks:
        h.remove()
    control = [torch.randn(s, generator=g) * 0.5 for s in shapes]
    with torch.no_grad():
        out = ours(x, t, Cond(ctx), control=control)
        want = ref(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=tuple(control[:-1]),
                   mid_block_additional_residual=control[-1]).sample
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    assert (out - plain).abs().max() > 1e-2
    with pytest.raises(ValueError, match="residuals"):
        ours(x, t, Cond(ctx), control=control[:-1])


def test_cond_batching_rules():
    a = Cond(torch.zeros(2, 77, 8), vector=torch.tensor([1, 2]), concat=torch.zeros(2, 5, 4, 4))
    b = Cond(torch.ones(1, 77, 8), vector=torch.tensor([3]), concat=torch.ones(1, 5, 4, 4))
    both = Cond.cat([a, b])
    assert both.crossattn.shape == (3, 77, 8) and both.vector.tolist() == [1, 2, 3] and both.concat.shape[0] == 3
    assert not a.batchable_with(Cond(torch.zeros(2, 154, 8), vector=torch.tensor([1, 2]), concat=a.concat))
    assert not a.batchable_with(Cond(a.crossattn))  # a part on one side only
    with pytest.raises(ValueError, match="separate calls"):
        Cond.cat([a, Cond(a.crossattn)])
    half = a.to(torch.bfloat16)
    assert half.crossattn.dtype == torch.bfloat16 and half.vector.dtype == torch.int64  # labels stay integers


def test_cfg_with_different_token_counts_runs_separate_calls_with_the_same_result(tiny_models):
    """An uncond of 154 tokens that repeats the 77 (attention over duplicated keys is the same attention)
    cannot be batched with the 77-token cond: CFG makes two calls and gets the batched result."""
    engine = stablekit.load(tiny_models["sd1"].single_file)
    ctx = engine.context
    text = encode_text(ctx, ["a red circle", "a red circle"])
    negative = encode_text(ctx, ["blurry", "blurry"])
    batches = []
    hook = ctx.model.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g) * 5
    with torch.no_grad():
        batched = CFGDenoiser(ctx.denoiser(), Cond(text), Cond(negative), 7.0)(x, 5.0)
        long_negative = Cond(torch.cat([negative, negative], dim=1))
        separate = CFGDenoiser(ctx.denoiser(), Cond(text), long_negative, 7.0)(x, 5.0)
    hook.remove()
    assert batches == [4, 2, 2]
    assert batched.abs().max() > 1
    # float32 rounding of a softmax over 154 keys instead of 77, times the guidance scale of 7
    torch.testing.assert_close(separate, batched, atol=2e-4, rtol=1e-4)


def _with_input_channels(tiny, tmp_path, channels: int):
    sd = load_file(str(tiny.single_file))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    w = sd[key]
    sd[key] = torch.cat([w, torch.zeros(w.shape[0], channels - w.shape[1], *w.shape[2:])], dim=1)
    path = tmp_path / f"tiny-{channels}ch.safetensors"
    save_file(sd, str(path))
    return path, sd


@pytest.mark.parametrize("channels, kind, variant", [(5, "depth", "depth"), (7, "lowres", "upscaler")])
def test_model_kind_is_read_off_the_input_channels(tiny_models, tmp_path, capsys, channels, kind, variant):
    path, sd = _with_input_channels(tiny_models["sd1"], tmp_path, channels)
    cfg = detect(sd)
    assert (cfg.inputs, cfg.variant, cfg.kind.channels) == (kind, variant, channels - 4)
    assert main(["txt2img", "--model", str(path), "--prompt", "x", "--steps", "1", "--out", str(tmp_path)]) == 2
    assert f"txt2img needs a base model; this is {cfg.kind.what}" in capsys.readouterr().err
    assert main(["info", str(path)]) == 0  # what it is can still be shown
    assert variant in capsys.readouterr().out


def test_a_kind_no_task_runs_is_refused_at_load(tiny_models, tmp_path, monkeypatch):
    from stablekit import task_table as tasks

    path, _ = _with_input_channels(tiny_models["sd1"], tmp_path, 5)
    monkeypatch.setattr(tasks, "TASKS", {k: t for k, t in tasks.TASKS.items() if k != "depth2img"})
    with pytest.raises(CheckpointError, match="depth.*no task here runs it"):
        stablekit.load(path)


def test_unknown_input_channel_count_is_named(tiny_models, tmp_path):
    _, sd = _with_input_channels(tiny_models["sd1"], tmp_path, 6)
    with pytest.raises(CheckpointError, match="6 input channels; known are 4 \\(base\\), 9 \\(inpaint\\)"):
        detect(sd)
