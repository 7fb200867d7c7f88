"""The SD x4 upscaler: a diffusion model that paints a 4x larger picture from a small one.

The low-resolution picture, noised by its own DDPM schedule to `noise_level` (LDM's
ImageConcatWithNoiseAugmentation), is the UNet's extra input channels, and the noise level its
class label; the latent has the small picture's size and the VAE decodes it 4x larger. Seeds as
diffusers' StableDiffusionUpscalePipeline draws them: image i's generator (seed + i) first draws the
augmentation noise (the small picture's shape), then the latent noise, so a seed gives its picture.

Large pictures: the UNet runs on overlapping latent tiles whose outputs are cross-faded at every
step (one general wrapper around the network call), and the VAE decodes in tiles, so memory
depends on the tile size, not the picture's.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from ..config import LowResConfig, ScheduleConfig
from ..diffusion.cond import Cond
from ..diffusion.denoiser import UNetFn
from ..diffusion.common import Callback
from ..diffusion.schedule import ModelSchedule
from ..images import to_tensor
from ..models.vae_tiling import tiled
from ..params import GenerationParams
from .conditioning import TaskContext, guided_denoiser
from .editing import Canvas
from .steps import denoise, generators_for, plan_sampling

MULTIPLE = 8  # the UNet halves the latent three times


def padded_size(width: int, height: int) -> tuple[int, int]:
    """The small picture's size rounded up to whole UNet cells (it is padded with its edge pixels)."""
    return -(-width // MULTIPLE) * MULTIPLE, -(-height // MULTIPLE) * MULTIPLE


def upscale_canvas(image: Image.Image, device: torch.device) -> Canvas:
    """The picture padded with its edges to a multiple of 8; `latent_crop` cuts the result back to 4x it."""
    w, h = padded_size(image.width, image.height)
    array = np.asarray(image.convert("RGB"))
    padded = np.pad(array, ((0, h - image.height), (0, w - image.width), (0, 0)), mode="edge")
    return Canvas(picture=to_tensor(Image.fromarray(padded)).to(device), latent_crop=(image.height, image.width))


def noise_augment(lowres: LowResConfig, pictures: torch.Tensor, noise: torch.Tensor, level: int) -> torch.Tensor:
    """pictures [B, 3, h, w] in [-1, 1] noised to DDPM step `level`: sqrt(a) x + sqrt(1 - a) noise."""
    if not 0 <= level <= lowres.max_noise_level:
        raise ValueError(f"noise level must be from 0 to {lowres.max_noise_level}, got {level}")
    schedule = ModelSchedule(ScheduleConfig(lowres.linear_start, lowres.linear_end, lowres.timesteps))
    a = float(schedule.alphas_cumprod[level])
    return a**0.5 * pictures + (1 - a) ** 0.5 * noise


def tiled_unet(unet: UNetFn, tile: int, overlap: int) -> UNetFn:
    """The network call on overlapping tiles of the latent (and of the extra channels with it), the
    outputs cross-faded over the overlaps; one tile covering the latent is exactly the plain call."""
    def call(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        c = x.shape[1]
        both = x if cond.concat is None else torch.cat([x, cond.concat.to(x.dtype)], dim=1)

        def one(part: torch.Tensor) -> torch.Tensor:
            extra = None if cond.concat is None else part[:, c:]
            return unet(part[:, :c], t, replace(cond, concat=extra))

        return tiled(one, both, tile, overlap, 1.0)
    return call


def upscale_latents(ctx: TaskContext, p: GenerationParams, canvas: Canvas, noise: torch.Tensor | None = None,
                    callback: Callback | None = None) -> torch.Tensor:
    """Latents [B, 4, h, w] at the small picture's size; `noise` [B, 4, h, w] replaces the latent noise."""
    lowres = ctx.model.cfg.lowres
    picture = canvas.picture
    _, _, h, w = picture.shape
    generators = generators_for(p.image_seeds)
    # diffusers' order: each generator draws the augmentation noise first, then the latent noise.
    aug_noise = torch.cat([torch.randn((1, 3, h, w), generator=g, dtype=torch.float32) for g in generators])
    small = noise_augment(lowres, picture * 2 - 1, aug_noise.to(picture.device), p.noise_level)
    level = torch.full((p.batch_size,), p.noise_level, dtype=torch.long, device=ctx.device)
    plan = plan_sampling(ctx.schedule, p, ctx.latent_shape(p.width, p.height), ctx.device, noise,
                         generators=generators)
    unet = tiled_unet(ctx.model.unet, p.upscale_tile, p.upscale_tile // 4) if p.upscale_tile else None
    latents = denoise(guided_denoiser(ctx, p, plan, small, level, unet), plan, callback=callback)
    rows, cols = canvas.latent_crop or (h, w)
    return latents[..., :rows, :cols]


def upscale_size(image: Image.Image) -> tuple[int, int]:
    """The working size: 4x the padded picture (the result is cropped back to 4x the picture)."""
    w, h = padded_size(image.width, image.height)
    return 4 * w, 4 * h
