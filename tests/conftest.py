"""Fixtures: tiny random-weight SD1-like and SD2-v-like models in the real file formats.

Weights are drawn at random in the original LDM layout and written as a single-file
checkpoint. The diffusers folder is made from that file by diffusers' own single-file
converters (an implementation outside this project), then saved with `save_pretrained`,
so the two formats are checked against each other, not produced by the code under test.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import types
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from stablekit.threads import CpuSample, auto_threads

# The suite picks its thread count once, before torch starts its thread pool: the cores other
# programs leave free now (or OMP_NUM_THREADS as given). Subprocesses inherit it, and results
# compared byte-exactly across processes then come from the same count.
os.environ["OMP_NUM_THREADS"] = str(auto_threads(CpuSample.now()))

import torch  # noqa: E402 - after the thread count is fixed
import yaml
from safetensors.torch import load_file, save_file

from stablekit.bench.diffusers_folder import ldm_yaml, write_diffusers
from stablekit.config import LowResConfig, ModelConfig, ScheduleConfig, TextEncoderConfig, UNetConfig, VAEConfig
from stablekit.models import StableDiffusionModel


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
        return replace(base, inputs="inpaint", unet=replace(base.unet, in_channels=9))
    if family == "sd1":
        text = TextEncoderConfig("clip", width=128, layers=2, heads=2, mlp_width=256)
        unet = UNetConfig(model_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=2, attention_levels=(0, 1, 2),
                          num_heads=8, context_dim=128)
        return ModelConfig("sd1", "none", "eps", text, unet, vae)
    text = TextEncoderConfig("openclip", width=128, layers=2, heads=2, mlp_width=256)
    unet = UNetConfig(model_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1, attention_levels=(0, 1, 2),
                      num_heads=-1, num_head_channels=16, context_dim=128, use_linear_in_transformer=True)
    return ModelConfig("sd2", "none", "v", text, unet, vae)


def tiny_upscaler_config() -> ModelConfig:
    """x4-upscaling.yaml in miniature: 7 input channels, the noise level as one of 1000 class labels,
    8 heads, attention at levels 1-3 with text-only attn1 at levels 1 and 2, an f = 4 VAE.

    The context width (160) differs from every level's channels (64, 64, 128), so the weights tell
    which attn1 attends to the text; level 3 grows the channels, so input_blocks.10.0 has the skip
    convolution diffusers' detector looks for to call a file an upscaler.
    """
    text = TextEncoderConfig("openclip", width=160, layers=2, heads=2, mlp_width=256)
    unet = UNetConfig(in_channels=7, model_channels=32, channel_mult=(1, 2, 2, 4), num_res_blocks=2,
                      attention_levels=(1, 2, 3), num_heads=8, num_head_channels=-1, context_dim=160,
                      use_linear_in_transformer=True, num_classes=1000, cross_only_levels=(1, 2))
    vae = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, scale_factor=0.08333)
    return ModelConfig("sd2", "lowres", "v", text, unet, vae, ScheduleConfig(1e-4, 2e-2), lowres=LowResConfig())


def low_scale_buffers(lowres: LowResConfig) -> dict[str, torch.Tensor]:
    """The `low_scale_model.*` buffers an original upscaler file carries (LDM AbstractLowScaleModel)."""
    betas = torch.linspace(lowres.linear_start**0.5, lowres.linear_end**0.5, lowres.timesteps, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, 0)
    buffers = {"betas": betas, "alphas_cumprod": a, "alphas_cumprod_prev": torch.cat([torch.ones(1, dtype=a.dtype), a[:-1]]),
               "sqrt_alphas_cumprod": a.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - a).sqrt(),
               "log_one_minus_alphas_cumprod": (1 - a).log(), "sqrt_recip_alphas_cumprod": a.rsqrt(),
               "sqrt_recipm1_alphas_cumprod": (1 / a - 1).sqrt()}
    return {f"low_scale_model.{k}": v.float() for k, v in buffers.items()}


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
def tiny_upscaler(tmp_path_factory) -> TinyModel:
    """A tiny x4 upscaler as its original single file comes: LDM layout, `low_scale_model.*` buffers and no
    .yaml beside it. The diffusers folder (a StableDiffusionUpscalePipeline) is made by diffusers' own
    single-file converters from the LDM config (with disable_self_attentions and num_classes), as for the others."""
    root = tmp_path_factory.mktemp("tiny_upscaler")
    cfg = tiny_upscaler_config()
    sd = {**ldm_state_dict(cfg, seed=200), **low_scale_buffers(cfg.lowres)}
    conf = ldm_yaml(cfg)
    single = root / "tiny-x4-upscaler.safetensors"
    save_file(sd, str(single))
    folder = root / "tiny-x4-upscaler-diffusers"
    write_diffusers(sd, cfg, conf, folder, root)
    return TinyModel("tiny-x4-upscaler", cfg, single, folder, conf)


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


@dataclass
class TinyControlNet:
    folder: Path  # diffusers ControlNetModel
    single: Path  # original layout, .safetensors
    prefixed_fp16: Path  # original layout under control_model., fp16, as a .pth


@pytest.fixture(scope="session")
def tiny_controlnets(tiny_models, tmp_path_factory) -> dict[str, list[TinyControlNet]]:
    """Two random ControlNets per tiny model, made by diffusers from its UNet: the diffusers folder, the
    original layout as .safetensors, and under `control_model.` in fp16 as a .pth."""
    diffusers = pytest.importorskip("diffusers")
    from stablekit.addons.controlnet_files import _diffusers_to_original

    root = tmp_path_factory.mktemp("controlnets")
    made: dict[str, list[TinyControlNet]] = {}
    for family in ("sd1", "sd2", "sd1-inpaint"):
        unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_models[family].diffusers_dir / "unet")
        nets = []
        for k in range(2):
            cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
            randomize(cn, 300 + 10 * k + len(made))
            folder = root / f"control_{family}_{k}_diffusers"
            cn.save_pretrained(folder)
            tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
            recipes = _diffusers_to_original(list(tensors), None)
            sd = {new: tensors[old[0]].contiguous() for new, (old, _) in recipes.items()}
            single = root / f"control_{family}_{k}.safetensors"
            save_file(sd, str(single))
            pth = root / f"control_{family}_{k}_fp16.pth"
            torch.save({"control_model." + key: v.half() for key, v in sd.items()}, pth)
            nets.append(TinyControlNet(folder, single, pth))
        made[family] = nets
    return made
