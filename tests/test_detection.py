"""Detection on full-size key layouts, checked against diffusers' own single-file code.

The full-size state dicts are built from our modules on the meta device (shapes only, no
memory), plus the extra keys real original checkpoints carry. diffusers' detector and its
LDM -> diffusers converters are an independent oracle: if they map every key of our layout
onto their own full-size models with equal shapes, our layout is what real files contain.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from stablekit.checkpoint import build_and_load, open_checkpoint
from stablekit.config import PRESETS, SD1_TEXT, SD2_TEXT
from stablekit.detect import CheckpointError, Hints, detect, unused_keys
from stablekit.models import StableDiffusionModel

OPENCLIP = "cond_stage_model.model."
TRAINING_EXTRAS = ("alphas_cumprod", "betas", "model_ema.decay", "model_ema.num_updates")

# LDM original configs (as in the CompVis / Stability repos' v1-inference.yaml, v2-inference-v.yaml,
# v1-inpainting-inference.yaml), written out here, not derived from stablekit's configs.
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
SD1_UNET_LDM = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
                "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8,
                "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768, "use_checkpoint": True,
                "legacy": False}
SD2_UNET_LDM = {"use_checkpoint": True, "use_fp16": True, "image_size": 32, "in_channels": 4, "out_channels": 4,
                "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
                "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_spatial_transformer": True,
                "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 1024, "legacy": False}


def ldm_config(unet: dict, parameterization: str | None = None) -> dict:
    params = {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
              "unet_config": {"params": unet}, "first_stage_config": {"params": {"ddconfig": VAE_DDCONFIG}}}
    if parameterization:
        params["parameterization"] = parameterization
    return {"model": {"params": params}}


ORIGINAL_CONFIGS = {
    "sd1": ldm_config(SD1_UNET_LDM),
    "sd1-inpainting": ldm_config({**SD1_UNET_LDM, "in_channels": 9}),
    "sd2": ldm_config(SD2_UNET_LDM, "v"),
}
DIFFUSERS_TYPES = {"sd1": "v1", "sd1-inpainting": "inpainting", "sd2": "v2"}
# (family, variant, in_channels, context_dim, text layout, computed text layers)
EXPECTED = {
    "sd1": ("sd1", "base", 4, 768, "clip", 12),
    "sd1-inpainting": ("sd1", "inpaint", 9, 768, "clip", 12),
    "sd2": ("sd2", "base", 4, 1024, "openclip", 23),
}


def full_size_state_dict(preset: str) -> dict[str, torch.Tensor]:
    """Meta tensors in the original layout, with the extra keys real single files carry."""
    cfg = PRESETS[preset]
    with torch.device("meta"):
        model = StableDiffusionModel(cfg)
    sd = dict(model.state_dict())
    meta = dict(device="meta")
    if cfg.text.layout == "clip":
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.empty(1, 77, dtype=torch.int64, **meta)
    else:  # OpenCLIP ViT-H: 24 blocks in the file (SD 2 computes 23), and the projection head
        for k, v in list(sd.items()):
            if k.startswith(OPENCLIP + "transformer.resblocks.0."):
                sd[k.replace("resblocks.0.", "resblocks.23.", 1)] = torch.empty(v.shape, dtype=v.dtype, **meta)
        sd[OPENCLIP + "text_projection"] = torch.empty(1024, 1024, **meta)
        sd[OPENCLIP + "logit_scale"] = torch.empty((), **meta)
    for k in TRAINING_EXTRAS:
        sd[k] = torch.empty((1000,) if "alphas" in k or k == "betas" else (), **meta)
    sd["model_ema.diffusion_modelinput_blocks00weight"] = torch.empty(320, cfg.unet.in_channels, 3, 3, **meta)
    return sd


@pytest.fixture(scope="module")
def full_size():
    return {preset: full_size_state_dict(preset) for preset in EXPECTED}


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_detect_full_size(full_size, preset):
    sd = full_size[preset]
    cfg = detect(sd)
    family, variant, in_ch, ctx, layout, layers = EXPECTED[preset]
    assert (cfg.family, cfg.variant) == (family, variant)
    assert cfg.unet.in_channels == in_ch and cfg.unet.out_channels == 4
    assert cfg.unet.context_dim == ctx
    assert (cfg.text.layout, cfg.text.layers, cfg.text.width) == (layout, layers, ctx)
    assert cfg.prediction == "eps"  # the weights cannot tell; no hint given
    # Everything else equals the preset of the real sizes.
    assert cfg == PRESETS[preset]
    assert cfg.text == (SD1_TEXT if family == "sd1" else SD2_TEXT)
    if family == "sd2":
        # the 24th block is carried but not computed: exactly one block is dropped, never more
        assert unused_keys(OPENCLIP + "transformer.resblocks.23.ln_1.weight", cfg)
        assert not unused_keys(OPENCLIP + "transformer.resblocks.22.ln_1.weight", cfg)


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_build_and_load_key_check_accepts_full_size(full_size, preset):
    sd = full_size[preset]
    cfg = detect(sd)
    with torch.device("meta"):
        model = StableDiffusionModel(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    kept = {k: tuple(v.shape) for k, v in sd.items() if not unused_keys(k, cfg)}
    assert set(kept) == set(expected), (sorted(set(expected) - set(kept))[:5], sorted(set(kept) - set(expected))[:5])
    assert kept == expected
    # Only the extras are dropped.
    dropped = {k for k in sd if unused_keys(k, cfg)}
    assert set(TRAINING_EXTRAS) <= dropped
    assert all(k in TRAINING_EXTRAS or k.startswith(("model_ema.", OPENCLIP + "transformer.resblocks.23."))
               or k.endswith(("position_ids", "text_projection", "logit_scale")) for k in dropped), dropped
    # And the real check passes too: build_and_load gets as far as the (meta -> meta) assignment.
    loaded = build_and_load(cfg, sd, dtype=torch.float16, device="meta")
    assert next(loaded.unet.parameters()).dtype == torch.float16


def test_build_and_load_reports_missing_and_wrong_keys_at_full_size(full_size):
    sd = dict(full_size["sd1"])
    cfg = detect(sd)
    del sd["model.diffusion_model.middle_block.1.proj_out.weight"]
    sd["first_stage_model.decoder.norm_out.weight"] = torch.empty(64, device="meta")
    with pytest.raises(CheckpointError) as e:
        build_and_load(cfg, sd, dtype=torch.float32, device="meta")
    assert "model.diffusion_model.middle_block.1.proj_out.weight" in str(e.value)
    assert "first_stage_model.decoder.norm_out.weight" in str(e.value)


def test_sd2_yaml_style_hints(full_size):
    cfg = detect(full_size["sd2"], Hints(prediction="v", prediction_source="x.yaml", unet_num_head_channels=64))
    assert cfg == PRESETS["sd2-v"]
    assert cfg.name == "sd2-v"


# --- diffusers as the oracle --------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_diffusers_detector_agrees(full_size, preset):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    assert infer_diffusers_model_type(full_size[preset]) == DIFFUSERS_TYPES[preset]


def _compare(converted: dict, module: torch.nn.Module) -> None:
    theirs = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in converted.items()}
    missing, unexpected = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    wrong = [(k, ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]]
    assert not wrong, wrong[:5]
    # and torch agrees: a strict load (assign, so meta tensors are fine) raises nothing
    module.load_state_dict(converted, strict=True, assign=True)


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_diffusers_converts_unet_and_vae_to_full_size_models(full_size, preset):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as su

    sd, original = full_size[preset], ORIGINAL_CONFIGS[preset]
    unet_conf = su.create_unet_diffusers_config_from_ldm(original, sd)
    vae_conf = su.create_vae_diffusers_config_from_ldm(original, sd)
    assert unet_conf["sample_size"] == (96 if preset == "sd2" else 64)  # diffusers' defaults per detected type
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_conf)
        vae = AutoencoderKL(**vae_conf)
    _compare(su.convert_ldm_unet_checkpoint(sd, unet_conf), unet)
    _compare(su.convert_ldm_vae_checkpoint(sd, vae_conf), vae)
    # the published sizes: SD 1.x UNet 859.5M (860M with 9 input channels), SD 2.x 865.9M, VAE 83.7M
    n_unet = sum(p.numel() for p in unet.parameters())
    assert n_unet == {"sd1": 859_520_964, "sd1-inpainting": 859_535_364, "sd2": 865_910_724}[preset]
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_diffusers_converts_text_encoder_to_full_size_model(full_size, preset):
    from diffusers.loaders import single_file_utils as su
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = full_size[preset]
    if preset.startswith("sd1"):  # openai/clip-vit-large-patch14
        conf = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    else:  # stabilityai/stable-diffusion-2-1 text_encoder (OpenCLIP ViT-H, 23 blocks)
        conf = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                              num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")
    with torch.device("meta"):
        text = CLIPTextModel(conf)
    if preset.startswith("sd1"):
        converted = su.convert_ldm_clip_checkpoint(sd)
    else:  # diffusers' own ignore list drops block 23 (as our unused_keys does)
        converted = su.convert_open_clip_checkpoint(text, sd)
        converted.pop("text_projection.weight", None)  # CLIPTextModel has no projection head
    if not any(k.startswith("text_model.") for k in text.state_dict()):  # transformers >= 5 drops the prefix
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    theirs = {k: tuple(v.shape) for k, v in text.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in converted.items()}
    # position_ids is a buffer that some transformers versions keep out of the state dict
    missing = sorted(k for k in set(theirs) - set(ours) if not k.endswith("position_ids"))
    unexpected = sorted(k for k in set(ours) - set(theirs) if not k.endswith("position_ids"))
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    assert all(ours[k] == theirs[k] for k in ours if k in theirs)


# --- the two formats, and where the prediction type came from -----------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_folder_detects_like_single_file(tiny_models, family):
    tiny = tiny_models[family]
    single = open_checkpoint(tiny.single_file)
    folder = open_checkpoint(tiny.diffusers_dir)
    assert folder.config.resolution == 64  # the folder's unet sample_size (8); the bare file says nothing
    assert single.config == replace(folder.config, resolution=512)
    assert single.config == tiny.config  # and both are what the fixture was built from
    assert single.config.prediction == ("v" if family == "sd2" else "eps")
    assert "format: diffusers folder" in folder.notes
    assert "format: single file (.safetensors)" in single.notes


def _prediction_note(notes: list[str]) -> str:
    found = [n for n in notes if n.startswith("prediction:")]
    assert len(found) == 1, notes
    return found[0]


def test_prediction_from_sidecar_yaml(tiny_models):
    sd2 = tiny_models["sd2"]
    yaml_name = sd2.single_file.with_suffix(".yaml").name
    opened = open_checkpoint(sd2.single_file)
    assert opened.config.prediction == "v"
    assert _prediction_note(opened.notes) == f"prediction: v ({yaml_name})"
    assert f"config: {yaml_name}" in opened.notes


def test_prediction_default_without_yaml_says_so(tiny_models):
    opened = open_checkpoint(tiny_models["sd1"].single_file)
    note = _prediction_note(opened.notes)
    assert opened.config.prediction == "eps"
    assert note.startswith("prediction: eps (default") and "--prediction" in note


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_prediction_from_scheduler_config(tiny_models, family):
    opened = open_checkpoint(tiny_models[family].diffusers_dir)
    pred = "v" if family == "sd2" else "eps"
    assert opened.config.prediction == pred
    assert _prediction_note(opened.notes) == f"prediction: {pred} (scheduler/scheduler_config.json)"


@pytest.mark.parametrize("family, kind, flag", [("sd2", "single_file", "eps"), ("sd1", "single_file", "v"),
                                                ("sd2", "diffusers_dir", "eps")])
def test_prediction_flag_beats_yaml_and_scheduler_config(tiny_models, family, kind, flag):
    opened = open_checkpoint(getattr(tiny_models[family], kind), prediction=flag)
    assert opened.config.prediction == flag
    assert _prediction_note(opened.notes) == f"prediction: {flag} (--prediction)"


def test_cli_info_shows_the_detection(tiny_models, capsys):
    from stablekit.cli import main

    assert main(["info", str(tiny_models["sd2"].diffusers_dir), "--prediction", "eps"]) == 0
    out = capsys.readouterr().out
    assert "openclip, 2 layers, width 128" in out
    assert "prediction: eps (--prediction)" in out
    assert "format: diffusers folder" in out

