"""A diffusers pipeline folder made from an original-layout single file, by diffusers' own converters.

The tests and the benchmark use this to give the reference implementation the very same weights:
diffusers' single-file code (`diffusers.loaders.single_file_utils`, an implementation outside this
project) converts them, `save_pretrained` writes the folder, and the reference side loads it the way
a user would, with `from_pretrained`. diffusers and transformers are imported inside the functions:
they are test and benchmark dependencies, never the engine's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..config import ModelConfig
from ..models.vocab_files import vocab_files

SD_NORM_GROUPS = 32  # GroupNorm groups of every released SD model; the LDM config has no key for it


def ldm_yaml(cfg: ModelConfig) -> dict:
    """The LDM model config (as shipped next to real checkpoints) describing `cfg`."""
    u, v = cfg.unet, cfg.vae
    ds = [2**level for level in u.attention_levels]
    unet = {"in_channels": u.in_channels, "out_channels": u.out_channels, "model_channels": u.model_channels,
            "channel_mult": list(u.channel_mult), "num_res_blocks": u.num_res_blocks, "attention_resolutions": ds,
            "transformer_depth": u.transformer_depth, "context_dim": u.context_dim,
            "use_linear_in_transformer": u.use_linear_in_transformer}
    unet.update({"num_heads": u.num_heads} if u.num_heads > 0 else {"num_head_channels": u.num_head_channels})
    if u.num_classes:  # class labels through an embedding table
        unet["num_classes"] = u.num_classes
    if u.adm_in_channels:  # a float vector through two linear layers
        unet.update(num_classes="sequential", adm_in_channels=u.adm_in_channels)
    if u.cross_only_levels:  # attn1 attends to the text at these levels (the x4 upscaler)
        unet["disable_self_attentions"] = [level in u.cross_only_levels for level in range(len(u.channel_mult))]
    ddconfig = {"ch": v.ch, "ch_mult": list(v.ch_mult), "num_res_blocks": v.num_res_blocks, "z_channels": v.z_channels,
                "in_channels": 3, "out_ch": 3, "resolution": 256, "double_z": True, "attn_resolutions": []}
    # Not LDM keys but diffusers' name, which stablekit's .yaml reader accepts: only small models need it.
    if u.norm_groups != SD_NORM_GROUPS:
        unet["norm_num_groups"] = u.norm_groups
    if v.norm_groups != SD_NORM_GROUPS:
        ddconfig["norm_num_groups"] = v.norm_groups
    s = cfg.schedule
    params = {"linear_start": s.linear_start, "linear_end": s.linear_end, "timesteps": s.timesteps,
              "scale_factor": v.scale_factor, "unet_config": {"params": unet},
              "first_stage_config": {"params": {"ddconfig": ddconfig}}}
    if cfg.prediction == "v":
        params["parameterization"] = "v"
    if cfg.lowres is not None:  # the x4 upscaler's noise augmentation of its low-res input
        lr = cfg.lowres
        noise = {"linear_start": lr.linear_start, "linear_end": lr.linear_end, "timesteps": lr.timesteps}
        params["low_scale_config"] = {
            "target": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
            "params": {"noise_schedule_config": noise, "max_noise_level": lr.max_noise_level}}
    return {"model": {"params": params}}


def write_diffusers(sd: dict[str, torch.Tensor], cfg: ModelConfig, ldm_config: dict, folder: Path, tmp: Path) -> None:
    """Convert with diffusers' own single-file code and save as a diffusers pipeline folder.

    `tmp` is a scratch folder for the tokenizer's vocabulary files.
    """
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                           StableDiffusionUpscalePipeline, UNet2DConditionModel)
    from diffusers.loaders import single_file_utils as su
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # diffusers' config builders do not read GroupNorm groups (always 32 in released models): set them.
    unet_conf = su.create_unet_diffusers_config_from_ldm(ldm_config, sd, image_size=64)
    unet_conf["norm_num_groups"] = cfg.unet.norm_groups
    unet = UNet2DConditionModel(**unet_conf)
    unet.load_state_dict(su.convert_ldm_unet_checkpoint(sd, unet_conf), strict=True)
    vae_conf = su.create_vae_diffusers_config_from_ldm(ldm_config, sd, image_size=64)
    vae_conf["norm_num_groups"] = cfg.vae.norm_groups
    vae = AutoencoderKL(**vae_conf)
    vae.load_state_dict(su.convert_ldm_vae_checkpoint(sd, vae_conf), strict=True)

    t = cfg.text
    text_conf = CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_width,
                               num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=77,
                               hidden_act="quick_gelu" if t.layout == "clip" else "gelu",
                               bos_token_id=49406, eos_token_id=49407, pad_token_id=1 if t.layout == "clip" else 0)
    text = CLIPTextModel(text_conf)
    if t.layout == "clip":
        text_sd = su.convert_ldm_clip_checkpoint(sd)
    else:  # drop the never-used last block, as diffusers' ignore list does for the full-size block 23
        unused = f"cond_stage_model.model.transformer.resblocks.{t.layers}."
        text_sd = su.convert_open_clip_checkpoint(text, {k: v for k, v in sd.items() if not k.startswith(unused)})
        text_sd.pop("text_projection.weight", None)  # CLIPTextModel has no projection head
    if not any(k.startswith("text_model.") for k in text.state_dict()):  # transformers >= 5 drops the prefix
        text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    missing, unexpected = text.load_state_dict(text_sd, strict=False)
    leftovers = [k for k in missing + unexpected if not k.endswith("position_ids")]
    if leftovers:
        raise ValueError(f"text encoder conversion left keys unmatched: {leftovers[:10]}")

    vocab_files(tmp / "vocab")  # transformers 5 reads vocab files only through from_pretrained
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp / "vocab"), model_max_length=77,
                                              pad_token="<|endoftext|>" if t.layout == "clip" else "!")
    if len(tokenizer) != 49408:
        raise ValueError(f"CLIP tokenizer has {len(tokenizer)} tokens, expected 49408")
    s = cfg.schedule
    scheduler = DDIMScheduler(beta_start=s.linear_start, beta_end=s.linear_end, num_train_timesteps=s.timesteps,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if cfg.prediction == "v" else "epsilon")
    if cfg.lowres is not None:  # the x4 upscaler: as stabilityai/stable-diffusion-x4-upscaler's model_index.json
        lr = cfg.lowres
        low_res = DDPMScheduler(beta_start=lr.linear_start, beta_end=lr.linear_end, num_train_timesteps=lr.timesteps,
                                beta_schedule="scaled_linear")
        pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                              low_res_scheduler=low_res, scheduler=scheduler,
                                              max_noise_level=lr.max_noise_level)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def diffusers_folder_for(single_file: Path, cfg: ModelConfig) -> Path:
    """The cached diffusers folder next to `single_file`, made once (written aside, then renamed)."""
    folder = single_file.with_name(single_file.stem + "-diffusers")
    if (folder / "model_index.json").is_file():
        return folder
    from safetensors.torch import load_file

    scratch = single_file.with_name(single_file.stem + "-diffusers.tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    write_diffusers(load_file(str(single_file)), cfg, ldm_yaml(cfg), scratch / "pipeline", scratch)
    shutil.rmtree(folder, ignore_errors=True)
    (scratch / "pipeline").rename(folder)
    shutil.rmtree(scratch, ignore_errors=True)
    return folder
