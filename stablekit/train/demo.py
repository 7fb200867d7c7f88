"""The recipe of the shipped demo model: its sizes, the two training stages, and the export.

    stablekit train demo --out runs/demo      # about an hour on 2 CPU cores; resumable

The result is an ordinary SD 1.x-layout single-file checkpoint (fp16) plus a same-name `.yaml`
(LDM config format) that tells the loader the VAE scale factor, so it loads through the same code
as any downloaded checkpoint.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from ..config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..models import StableDiffusionModel
from .common import StageConfig
from .latent import train_latent_diffusion
from .vae import train_vae
from ..demo.shapes import Scene, caption, random_scene, render

SIZE = 64  # pictures are 64x64, latents 8x8

DEMO_CONFIG = ModelConfig(
    "sd1", "none", "eps",
    TextEncoderConfig("clip", width=64, layers=3, heads=1, mlp_width=256),  # heads = width // 64, as detected
    UNetConfig(model_channels=64, channel_mult=(1, 1, 2), num_res_blocks=1, attention_levels=(0, 1, 2),
               num_heads=8, context_dim=64, norm_groups=8),
    # 8 GroupNorm groups, not SD's 32: at 32 channels, 32 groups normalise each channel alone and
    # erase a flat picture's colour, which made the VAE learn several times slower.
    VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8),
)

PREVIEW_PROMPTS = [
    "a red circle on a blue background",
    "a yellow star on a black background",
    "a small green square in the top left corner, white background",
    "a purple triangle on a yellow background",
    "a blue ring and an orange diamond on a grey background",
]


@dataclass(frozen=True)
class Recipe:
    vae: StageConfig = StageConfig(steps=1500, batch_size=48, lr=1e-3, sample_every=250, seed=1)
    vae_crop_until: float = 0.8  # 32x32 crops (4x cheaper) until this fraction of the steps, then whole pictures
    kl_weight: float = 1e-4
    pool: int = 30_000  # training pictures, encoded once
    diffusion: StageConfig = StageConfig(steps=3500, batch_size=64, lr=5e-4, warmup=200, ema=0.999,
                                         sample_every=500, seed=2)
    caption_dropout: float = 0.1
    offset_noise: float = 0.1
    seed: int = 0


def scene_for(seed: int, index: int):
    """Training scene number `index`: the same on every run and machine."""
    return random_scene(random.Random(seed * 1_000_003 + index))


def _pictures(scenes) -> torch.Tensor:
    arr = np.stack([np.asarray(render(s, SIZE)) for s in scenes])  # [B, H, W, 3] uint8
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def init_weights(model: StableDiffusionModel, seed: int) -> None:
    """Default PyTorch init, CLIP's small embeddings, and zeroed last layers of residual branches (LDM)."""
    torch.manual_seed(seed)  # called inside train_demo's fork_rng: the caller's global RNG is left alone
    tm = model.text_encoder.transformer.text_model
    tm.embeddings.token_embedding.weight.normal_(0, 0.02)
    tm.embeddings.position_embedding.weight.normal_(0, 0.01)
    z = model.vae.cfg.z_channels  # start with a narrow posterior (log-variance -6), so the decoder sees the signal
    model.vae.quant_conv.bias[z:].fill_(-6.0)
    unet = model.unet
    for name, module in unet.named_modules():
        if name.endswith(("out_layers.3", "proj_out")) or name == "out.2":
            module.weight.zero_()
            module.bias.zero_()


def train_demo(out: Path, recipe: Recipe = Recipe()) -> Path | None:
    """Run both stages (resuming where a previous run stopped) and export the checkpoint; returns its path.

    Returns None when a stage's `stop_after` ended the run early: run again to resume.
    """
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():  # PyTorch's module init draws from the global RNG; seed it, then restore it
        torch.manual_seed(recipe.seed)
        model = StableDiffusionModel(DEMO_CONFIG)
        init_weights(model, recipe.seed)
    vae_file = out / "vae.safetensors"
    if vae_file.exists():
        from safetensors.torch import load_file
        model.vae.load_state_dict(load_file(str(vae_file)))
    else:
        crop_until = int(recipe.vae.steps * recipe.vae_crop_until)

        def vae_batches(step: int) -> torch.Tensor:
            rng = random.Random(recipe.seed * 7_919 + step)
            x = _pictures([random_scene(rng) for _ in range(recipe.vae.batch_size)])
            if step < crop_until:
                i, j = rng.randrange(SIZE // 2 + 1), rng.randrange(SIZE // 2 + 1)
                x = x[:, :, i:i + SIZE // 2, j:j + SIZE // 2]
            return x

        fixed = _pictures([scene_for(recipe.seed + 99, i) for i in range(8)])
        if train_vae(model.vae, vae_batches, recipe.vae, out, kl_weight=recipe.kl_weight,
                     preview=lambda _: fixed) < recipe.vae.steps:
            return None
        save_file({k: v.contiguous() for k, v in model.vae.state_dict().items()}, str(vae_file))
    model.vae.requires_grad_(False).eval()

    scenes = [scene_for(recipe.seed, i) for i in range(recipe.pool)]
    latents, scale = encode_pool(model, scenes, out / "pool.pt")
    print(f"stablekit: latent scale factor {scale:.5f}", flush=True)

    def diffusion_batches(step: int) -> tuple[torch.Tensor, list[str]]:
        rng = random.Random(recipe.seed * 104_729 + step)
        idx = [rng.randrange(recipe.pool) for _ in range(recipe.diffusion.batch_size)]
        return latents[idx] * scale, [caption(scenes[i], rng) for i in idx]

    model.vae.cfg = replace(model.vae.cfg, scale_factor=scale)  # previews decode with it; the .yaml records it
    done = train_latent_diffusion(model, diffusion_batches, recipe.diffusion, out,
                                  caption_dropout=recipe.caption_dropout, offset_noise=recipe.offset_noise,
                                  preview_prompts=PREVIEW_PROMPTS, preview_size=(SIZE, SIZE))
    if done < recipe.diffusion.steps:
        return None
    return export(model, out / "shapes-demo.safetensors")


@torch.no_grad()
def encode_pool(model: StableDiffusionModel, scenes: list[Scene], path: Path) -> tuple[torch.Tensor, float]:
    """Unscaled latent means [N, 4, 8, 8] of the training pool (cached), and the scale giving unit std."""
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return saved["latents"], float(saved["scale"])
    chunks = [model.vae.encode(_pictures(scenes[i:i + 250]))[0] for i in range(0, len(scenes), 250)]
    latents = torch.cat(chunks)
    scale = float(1 / latents.std())
    torch.save({"latents": latents, "scale": torch.tensor(scale)}, path)
    return latents, scale


def export(model: StableDiffusionModel, path: Path) -> Path:
    """The LDM single file (fp16 weights) and its `.yaml`: what the weights cannot tell, in LDM config keys."""
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"format": "pt", "stablekit": "shapes demo model"})
    u = DEMO_CONFIG.unet
    conf = {"model": {"params": {
        "parameterization": "eps",
        "image_size": SIZE // DEMO_CONFIG.vae.downscale,  # the training latent size: 64x64 pictures
        "scale_factor": round(model.vae.cfg.scale_factor, 6),
        "unet_config": {"params": {"num_heads": u.num_heads, "context_dim": u.context_dim,
                                   "norm_num_groups": u.norm_groups}},
        "first_stage_config": {"params": {"ddconfig": {"norm_num_groups": DEMO_CONFIG.vae.norm_groups}}},
    }}}
    path.with_suffix(".yaml").write_text(yaml.safe_dump(conf))
    return path
