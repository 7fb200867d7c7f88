"""The SD 2 x4 upscaler's networks (stable-diffusion-x4-upscaler): detection of its single file (no
.yaml beside it, as it ships) and of its diffusers folder, and parity of the UNet (7 input channels,
the noise level as a class label, text-only attn1 at levels 1-2) and the f = 4 VAE with diffusers'
UNet2DConditionModel and AutoencoderKL on the same weights. Full-size shapes are checked against
diffusers' own detector and converter with the published x4-upscaling.yaml."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from stablekit.checkpoint import build_and_load, load_model, open_checkpoint
from stablekit.config import PRESETS, LowResConfig, ScheduleConfig
from stablekit.detect import CheckpointError, Hints, detect, detect_unet, unused_keys
from stablekit.diffusion.cond import Cond
from stablekit.models import StableDiffusionModel

diffusers = pytest.importorskip("diffusers")

U = "model.diffusion_model."
OPENCLIP = "cond_stage_model.model."

# Stability-AI/stablediffusion configs/stable-diffusion/x4-upscaling.yaml, written out here (the parts the
# networks need), not derived from stablekit's configs.
X4_YAML = {"model": {"params": {
    "parameterization": "v", "linear_start": 0.0001, "linear_end": 0.02, "timesteps": 1000, "image_size": 128,
    "scale_factor": 0.08333,
    "low_scale_config": {"params": {"noise_schedule_config": {"linear_start": 0.0001, "linear_end": 0.02},
                                    "max_noise_level": 350}},
    "unet_config": {"params": {
        "num_classes": 1000, "image_size": 128, "in_channels": 7, "out_channels": 4, "model_channels": 256,
        "attention_resolutions": [2, 4, 8], "num_res_blocks": 2, "channel_mult": [1, 2, 2, 4],
        "disable_self_attentions": [True, True, True, False], "disable_middle_self_attn": False, "num_heads": 8,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 1024, "legacy": False,
        "use_linear_in_transformer": True}},
    "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}},
}}}
LOW_SCALE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod")


# --- detection ---------------------------------------------------------------------------------------


def test_both_formats_detect_the_same_upscaler(tiny_upscaler):
    single = open_checkpoint(tiny_upscaler.single_file)
    folder = open_checkpoint(tiny_upscaler.diffusers_dir)
    cfg = single.config
    assert cfg == tiny_upscaler.config  # what the fixture was built from
    assert folder.config == replace(cfg, resolution=64)  # the folder's unet sample_size 16 x f 4
    assert (cfg.inputs, cfg.variant, cfg.prediction, cfg.name) == ("lowres", "upscaler", "v", "sd2-x4-upscaler-v")
    assert cfg.schedule == ScheduleConfig(linear_start=1e-4, linear_end=2e-2, timesteps=1000)
    assert cfg.lowres == LowResConfig(max_noise_level=350, linear_start=1e-4, linear_end=2e-2, timesteps=1000)
    assert (cfg.vae.scale_factor, cfg.vae.downscale) == (0.08333, 4)
    u = cfg.unet
    assert (u.in_channels, u.num_classes, u.num_heads, u.attention_levels, u.cross_only_levels) == (7, 1000, 8, (1, 2, 3), (1, 2))
    # Where each fact came from: the file has no config, so the published one fills in; the folder has its own.
    assert any(n.startswith("upscaler:") and "x4-upscaling.yaml" in n for n in single.notes), single.notes
    assert "prediction: v (x4-upscaling.yaml, the upscaler's published config; none came with the model)" in single.notes
    assert "prediction: v (scheduler/scheduler_config.json)" in folder.notes
    assert not any(n.startswith("upscaler:") for n in folder.notes), folder.notes


def test_hints_beat_the_upscaler_defaults(tiny_upscaler):
    sd = load_file(str(tiny_upscaler.single_file))
    cfg = detect(sd, Hints(prediction="eps", prediction_source="--prediction", vae_scale_factor=0.5,
                           schedule=ScheduleConfig(), lowres=LowResConfig(max_noise_level=100)))
    assert (cfg.prediction, cfg.vae.scale_factor, cfg.schedule, cfg.lowres.max_noise_level) == ("eps", 0.5, ScheduleConfig(), 100)
    assert open_checkpoint(tiny_upscaler.single_file, prediction="eps").config.prediction == "eps"
    # the weights decide where they can: a hint that levels 1-2 self-attend does not change them
    assert detect(sd, Hints(unet_cross_only_levels=())).unet.cross_only_levels == (1, 2)


def test_sidecar_yaml_is_read_for_the_upscaler(tiny_upscaler, tmp_path):
    path = tmp_path / "x4.safetensors"
    path.write_bytes(tiny_upscaler.single_file.read_bytes())
    conf = yaml.safe_load(yaml.safe_dump(tiny_upscaler.ldm_config))
    conf["model"]["params"]["low_scale_config"]["params"]["max_noise_level"] = 250
    conf["model"]["params"]["linear_end"] = 0.03
    path.with_suffix(".yaml").write_text(yaml.safe_dump(conf))
    opened = open_checkpoint(path)
    assert opened.config.lowres.max_noise_level == 250 and opened.config.schedule.linear_end == 0.03
    assert "prediction: v (x4.yaml)" in opened.notes
    assert not any(n.startswith("upscaler:") for n in opened.notes)  # nothing was left for the defaults


def full_size_x4() -> dict[str, torch.Tensor]:
    """Meta tensors of the real x4 upscaler in the original layout, with the extras a real file carries."""
    with torch.device("meta"):
        sd = dict(StableDiffusionModel(PRESETS["sd2-x4-upscaler-v"]).state_dict())
    for k, v in list(sd.items()):  # OpenCLIP ViT-H: 24 blocks in the file, 23 computed; the projection head
        if k.startswith(OPENCLIP + "transformer.resblocks.0."):
            sd[k.replace("resblocks.0.", "resblocks.23.", 1)] = torch.empty(v.shape, device="meta")
    sd[OPENCLIP + "text_projection"] = torch.empty(1024, 1024, device="meta")
    sd[OPENCLIP + "logit_scale"] = torch.empty((), device="meta")
    for name in LOW_SCALE_BUFFERS:
        sd[f"low_scale_model.{name}"] = torch.empty(1000, device="meta")
    sd["betas"] = torch.empty(1000, device="meta")
    return sd


def test_full_size_upscaler_is_detected_without_a_config():
    sd = full_size_x4()
    cfg = detect(sd)
    # level 3 has 1024 channels = the context width: its weights cannot tell, the published config says self-attention
    assert cfg == PRESETS["sd2-x4-upscaler-v"]
    assert cfg.unet.heads_for(512) == cfg.unet.heads_for(1024) == 8
    assert all(unused_keys(f"low_scale_model.{name}", cfg) for name in LOW_SCALE_BUFFERS)
    loaded = build_and_load(cfg, sd, dtype=torch.float16, device="meta")  # every key checked, none left over
    assert loaded.unet.input_blocks[4][1].transformer_blocks[0].attn1.to_k.in_features == 1024  # level 1: text
    assert loaded.unet.input_blocks[10][1].transformer_blocks[0].attn1.to_k.in_features == 1024  # level 3: self
    assert loaded.unet.middle_block[1].transformer_blocks[0].attn1.to_k.in_features == 1024  # middle: self


def test_a_hint_decides_only_where_the_weights_cannot_tell():
    sd = full_size_x4()
    # level 3 (1024 channels = context width) follows the hint; levels 1-2 follow their weights
    assert detect(sd, Hints(unet_cross_only_levels=(0, 1, 2, 3))).unet.cross_only_levels == (1, 2, 3)
    assert detect(sd, Hints(unet_cross_only_levels=())).unet.cross_only_levels == (1, 2)


def test_diffusers_detects_and_converts_the_full_size_upscaler():
    from diffusers.loaders import single_file_utils as su

    sd = full_size_x4()
    assert su.infer_diffusers_model_type(sd) == "upscale"
    unet_conf = su.create_unet_diffusers_config_from_ldm(X4_YAML, sd)
    # as stabilityai/stable-diffusion-x4-upscaler's unet/config.json has them
    assert unet_conf["only_cross_attention"] == [True, True, True, False]
    assert (unet_conf["attention_head_dim"], unet_conf["num_class_embeds"], unet_conf["in_channels"]) == (8, 1000, 7)
    assert unet_conf["block_out_channels"] == [256, 512, 512, 1024] and unet_conf["down_block_types"][0] == "DownBlock2D"
    vae_conf = su.create_vae_diffusers_config_from_ldm(X4_YAML, sd)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**unet_conf)
        vae = diffusers.AutoencoderKL(**vae_conf)
    for converted, module in ((su.convert_ldm_unet_checkpoint(sd, unet_conf), unet),
                              (su.convert_ldm_vae_checkpoint(sd, vae_conf), vae)):
        theirs = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in converted.items()}
        assert ours == theirs, (sorted(set(theirs) ^ set(ours))[:5], [k for k in ours if ours[k] != theirs.get(k)][:5])


# --- the networks against diffusers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_upscaler):
    return load_model(tiny_upscaler.single_file)


def _inputs(cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 12, generator=g)  # [B, 4, h, w] latent at the low-res size
    lowres = torch.rand(2, 3, 8, 12, generator=g) * 2 - 1  # [B, 3, h, w] low-res picture in [-1, 1]
    ctx = torch.randn(2, 77, cfg.text.width, generator=g)
    return x, lowres, ctx, torch.tensor([999.0, 37.0]), torch.tensor([20, 350])


def _unet_diff(ours_unet, ref_unet, cfg) -> float:
    x, lowres, ctx, t, noise_level = _inputs(cfg)
    with torch.no_grad():
        ours = ours_unet(x, t, Cond(ctx, vector=noise_level, concat=lowres))
        ref = ref_unet(torch.cat([x, lowres], 1), t, encoder_hidden_states=ctx, class_labels=noise_level).sample
        other = ours_unet(x, t, Cond(ctx, vector=noise_level.flip(0), concat=lowres))
    assert ours.abs().max() > 0.1  # not two near-zero tensors
    assert (ours - other).abs().max() > 1e-3  # the noise level reaches the output
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    return (ours - ref).abs().max().item()


def test_unet_matches_diffusers(tiny_upscaler, loaded):
    ref = diffusers.UNet2DConditionModel.from_pretrained(tiny_upscaler.diffusers_dir / "unet").eval()
    assert ref.config.only_cross_attention == [False, True, True, False]
    err = _unet_diff(loaded.model.unet, ref, loaded.config)
    print(f"\n[parity] x4 upscaler UNet: max abs difference {err:.2e}")  # shown with pytest -s


def test_unet_from_the_folder_equals_the_single_file(tiny_upscaler, loaded):
    folder = load_model(tiny_upscaler.diffusers_dir)
    x, lowres, ctx, t, noise_level = _inputs(loaded.config, seed=1)
    cond = Cond(ctx, vector=noise_level, concat=lowres)
    with torch.no_grad():
        assert torch.equal(folder.model.unet(x, t, cond), loaded.model.unet(x, t, cond))


def test_text_only_attention_changes_the_output(loaded):
    """attn1 at a cross-only level attends to the text: another text changes its output even where the
    second attention (attn2) is left out of the comparison."""
    block = loaded.model.unet.input_blocks[4][1].transformer_blocks[0]
    assert block.cross_only and block.attn1.to_k.in_features == loaded.config.text.width
    assert not loaded.model.unet.middle_block[1].transformer_blocks[0].cross_only
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 10, 64, generator=g)
    ctx_a, ctx_b = torch.randn(2, 1, 77, 160, generator=g)
    with torch.no_grad():
        assert (block.attn1(x, ctx_a) - block.attn1(x, ctx_b)).abs().max() > 1e-3


def test_vae_decode_matches_diffusers(tiny_upscaler, loaded):
    ref = diffusers.AutoencoderKL.from_pretrained(tiny_upscaler.diffusers_dir / "vae").eval()
    assert ref.config.scaling_factor == 0.08333
    z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, want = loaded.model.vae.decode(z), ref.decode(z).sample
    assert ours.shape == (1, 3, 32, 48)  # f = 4
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)
    print(f"\n[parity] x4 upscaler VAE decode: max abs difference {(ours - want).abs().max().item():.2e}")


def test_diffusers_single_file_loaders_read_the_file(tiny_upscaler, loaded, tmp_path):
    """diffusers' own from_single_file reads the LDM file offline given the LDM config (the UNet and the
    VAE); the whole pipeline needs its configs as a folder (with only original_config it fetches the text
    encoder's config from the hub)."""
    conf = tmp_path / "x4-upscaling.yaml"
    conf.write_text(yaml.safe_dump(tiny_upscaler.ldm_config))
    file = str(tiny_upscaler.single_file)
    unet = diffusers.UNet2DConditionModel.from_single_file(file, original_config=str(conf), local_files_only=True)
    err = _unet_diff(loaded.model.unet, unet.eval(), loaded.config)
    print(f"\n[parity] x4 upscaler UNet via diffusers' from_single_file: max abs difference {err:.2e}")
    vae = diffusers.AutoencoderKL.from_single_file(file, original_config=str(conf), local_files_only=True).eval()
    assert vae.config.scaling_factor == 0.08333
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.vae.decode(z), vae.decode(z).sample, atol=1e-4, rtol=1e-4)
    pipe = diffusers.StableDiffusionUpscalePipeline.from_single_file(
        file, config=str(tiny_upscaler.diffusers_dir), local_files_only=True)
    assert pipe.config.max_noise_level == 350
    _unet_diff(loaded.model.unet, pipe.unet.eval(), loaded.config)


# --- bad input ---------------------------------------------------------------------------------------


def _broken(tiny, tmp_path, key: str, shape: tuple[int, ...]):
    sd = load_file(str(tiny.single_file))
    assert key in sd
    sd[key] = torch.zeros(shape)
    path = tmp_path / "broken-x4.safetensors"
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("key, shape, message", [
    # an output block whose attn1 self-attends although its level's input blocks attend to the text
    (U + "output_blocks.7.1.transformer_blocks.0.attn1.to_k.weight", (64, 64), "wrongly shaped keys"),
    (U + "output_blocks.7.1.transformer_blocks.0.attn1.to_v.weight", (64, 64), "wrongly shaped keys"),
    (U + "label_emb.weight", (1000, 64), "wrongly shaped keys"),  # the noise-level table, 128 wide in the UNet
    # attn1 taking neither the block's channels nor the text's width
    (U + "input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight", (64, 100), "neither the block's 64 channels"),
    # a text-only middle block (LDM disable_middle_self_attn), which no released model has
    (U + "middle_block.1.transformer_blocks.0.attn1.to_k.weight", (128, 160), "disable_middle_self_attn"),
])
def test_wrongly_shaped_upscaler_file_names_the_key(tiny_upscaler, tmp_path, key, shape, message):
    path = _broken(tiny_upscaler, tmp_path, key, shape)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(path)
    assert key in str(e.value)


def test_yaml_with_a_text_only_middle_block_is_refused(tiny_upscaler, tmp_path):
    path = tmp_path / "x4.safetensors"
    path.write_bytes(tiny_upscaler.single_file.read_bytes())
    conf = yaml.safe_load(yaml.safe_dump(tiny_upscaler.ldm_config))
    conf["model"]["params"]["unet_config"]["params"]["disable_middle_self_attn"] = True
    path.with_suffix(".yaml").write_text(yaml.safe_dump(conf))
    with pytest.raises(CheckpointError, match="x4.yaml: disable_middle_self_attn is not supported"):
        open_checkpoint(path)


def test_detect_unet_reads_the_text_only_levels_off_the_weights(tiny_upscaler):
    sd = load_file(str(tiny_upscaler.single_file))
    assert detect_unet(sd, Hints()).cross_only_levels == (1, 2)
