"""Fixtures: tiny random-weight SD1-like and SD2-v-like models in the real file formats.

Weights are drawn at random in the original LDM layout and written as a single-file
checkpoint. The diffusers folder is made from that file by diffusers' own single-file
converters (an implementation outside this project), then saved with `save_pretrained`,
so the two formats are checked against each other, not produced by the code under test.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import json
import math
import os
import sys
import types
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from stablekit.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from stablekit.models import StableDiffusionModel

VOCAB_GZ = Path(__file__).resolve().parents[1] / "stablekit" / "models" / "bpe_simple_vocab_16e6.txt.gz"


@dataclass
class TinyModel:
    name: str
    config: ModelConfig
    single_file: Path
    diffusers_dir: Path
    ldm_config: dict


def tiny_config(family: str) -> ModelConfig:
    vae = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
    if family == "sd1-inpaint":  # the 9-channel inpainting UNet: noisy latent + mask + masked-picture latent
        base = tiny_config("sd1")
        return replace(base, variant="inpaint", unet=replace(base.unet, in_channels=9))
    if family == "sd1":
        text = TextEncoderConfig("clip", width=128, layers=2, heads=2, mlp_width=256)
        unet = UNetConfig(model_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=2, attention_levels=(0, 1, 2),
                          num_heads=8, context_dim=128)
        return ModelConfig("sd1", "base", "eps", text, unet, vae)
    text = TextEncoderConfig("openclip", width=128, layers=2, heads=2, mlp_width=256)
    unet = UNetConfig(model_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1, attention_levels=(0, 1, 2),
                      num_heads=-1, num_head_channels=16, context_dim=128, use_linear_in_transformer=True)
    return ModelConfig("sd2", "base", "v", text, unet, vae)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights of sensible scale; norms get non-trivial affine parameters too."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if p.ndim == 1 and name.endswith("weight"):
            p.copy_(1 + 0.1 * r)
        elif p.ndim == 1:
            p.copy_(0.05 * r)
        else:
            p.copy_(r / math.sqrt(p[0].numel()))


def ldm_yaml(cfg: ModelConfig) -> dict:
    """The LDM model config (as shipped next to real checkpoints) describing `cfg`."""
    u, v = cfg.unet, cfg.vae
    ds = [2**level for level in u.attention_levels]
    unet = {"in_channels": u.in_channels, "out_channels": u.out_channels, "model_channels": u.model_channels,
            "channel_mult": list(u.channel_mult), "num_res_blocks": u.num_res_blocks, "attention_resolutions": ds,
            "transformer_depth": u.transformer_depth, "context_dim": u.context_dim,
            "use_linear_in_transformer": u.use_linear_in_transformer}
    unet.update({"num_heads": u.num_heads} if u.num_heads > 0 else {"num_head_channels": u.num_head_channels})
    params = {"scale_factor": v.scale_factor, "unet_config": {"params": unet},
              "first_stage_config": {"params": {"ddconfig": {
                  "ch": v.ch, "ch_mult": list(v.ch_mult), "num_res_blocks": v.num_res_blocks, "z_channels": v.z_channels,
                  "in_channels": 3, "out_ch": 3, "resolution": 256, "double_z": True, "attn_resolutions": []}}}}
    if cfg.prediction == "v":
        params["parameterization"] = "v"
    return {"model": {"params": params}}


def ldm_state_dict(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """A random checkpoint in the original layout, with the extras real files carry."""
    model = StableDiffusionModel(cfg)
    randomize(model, seed)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    if cfg.text.layout == "clip":
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:  # OpenCLIP: one more block that SD 2 never uses, plus the projection head
        p = f"cond_stage_model.model.transformer.resblocks.{cfg.text.layers}."
        for k, v in list(sd.items()):
            if k.startswith("cond_stage_model.model.transformer.resblocks.0."):
                sd[p + k.split("resblocks.0.", 1)[1]] = torch.randn(v.shape, generator=g) * 0.05
        sd["cond_stage_model.model.text_projection"] = torch.randn(cfg.text.width, cfg.text.width, generator=g)
        sd["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    sd["alphas_cumprod"] = torch.ones(1000)  # training buffers that real files carry
    return sd


def vocab_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt as the CLIP hub repos ship them, derived from the BPE file."""
    folder.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(VOCAB_GZ, "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = _bytes_to_unicode()
    vocab = list(byte_chars) + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]  # in CLIP's vocabulary order: printable bytes first


def write_diffusers(sd: dict, cfg: ModelConfig, ldm_config: dict, folder: Path, tmp: Path) -> None:
    """Convert with diffusers' own single-file code and save as a diffusers pipeline folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as su
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet_conf = su.create_unet_diffusers_config_from_ldm(ldm_config, sd, image_size=64)
    unet = UNet2DConditionModel(**unet_conf)
    unet.load_state_dict(su.convert_ldm_unet_checkpoint(sd, unet_conf), strict=True)
    vae_conf = su.create_vae_diffusers_config_from_ldm(ldm_config, sd, image_size=64)
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
    assert not leftovers, leftovers

    vocab_files(tmp / "vocab")  # transformers 5 reads vocab files only through from_pretrained
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp / "vocab"), model_max_length=77, pad_token="<|endoftext|>" if t.layout == "clip" else "!")
    assert len(tokenizer) == 49408
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if cfg.prediction == "v" else "epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Keep the tests' hash cache out of the user's cache folder."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, TinyModel]:
    root = tmp_path_factory.mktemp("tiny_models")
    models = {}
    for seed, family in enumerate(("sd1", "sd2", "sd1-inpaint")):
        cfg = tiny_config(family)
        name = f"tiny-{family}"
        sd = ldm_state_dict(cfg, seed=100 + seed)
        conf = ldm_yaml(cfg)
        single = root / f"{name}.safetensors"
        save_file(sd, str(single))
        if family == "sd2":  # heads and v-prediction are not in the weights: the sidecar says them
            single.with_suffix(".yaml").write_text(yaml.safe_dump(conf))
        folder = root / f"{name}-diffusers"
        write_diffusers(sd, cfg, conf, folder, root)
        models[family] = TinyModel(name, cfg, single, folder, conf)
    return models


@pytest.fixture(scope="session")
def kdiffusion():
    """k-diffusion's `sampling` and `external` modules, without its training-time package imports."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    tv = types.ModuleType("torchvision")  # utils imports torchvision at the top for training helpers only
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "torchvision", "torchvision.transforms",
                                             "torchvision.transforms.functional")}
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules.update({"k_diffusion": pkg, "torchvision": tv, "torchvision.transforms": tv.transforms,
                        "torchvision.transforms.functional": tv.transforms.functional})
    try:
        sampling = importlib.import_module("k_diffusion.sampling")
        external = importlib.import_module("k_diffusion.external")
    finally:  # the stub `k_diffusion` package stays: the loaded modules refer to it
        for k in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            if saved[k] is None:
                sys.modules.pop(k, None)
    return types.SimpleNamespace(sampling=sampling, external=external)
