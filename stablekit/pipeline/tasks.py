"""Tasks: short compositions of the shared steps. Each returns float pictures [B, 3, H, W] in [0, 1]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion.denoiser import CFGDenoiser, ModelDenoiser
from ..diffusion.samplers import Callback
from ..diffusion.schedule import ModelSchedule, make_sigmas
from ..models import StableDiffusionModel
from ..models.tokenizer import CLIPTokenizer
from ..params import GenerationParams
from .steps import decode, denoise, encode_prompt, generators_for, initial_noise


@dataclass
class TaskContext:
    """What a task needs from the engine: networks, tokenizer, schedule and numeric settings."""

    model: StableDiffusionModel
    tokenizer: CLIPTokenizer
    schedule: ModelSchedule
    device: torch.device
    dtype: torch.dtype
    quantize_timesteps: bool = False

    def denoiser(self) -> ModelDenoiser:
        unet = self.model.unet
        return ModelDenoiser(unet, self.schedule, self.model.cfg.prediction, self.dtype, self.quantize_timesteps)


def sampler_sigmas(schedule: ModelSchedule, p: GenerationParams) -> torch.Tensor:
    """The schedule the sampler walks: `steps` steps, or steps+1 less the next-to-last where the spec says."""
    if p.sampler_spec.discard_penultimate_sigma:
        sigmas = make_sigmas(schedule, p.schedule_name, p.steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return make_sigmas(schedule, p.schedule_name, p.steps)


def txt2img(
    ctx: TaskContext,
    p: GenerationParams,
    *,
    noise: torch.Tensor | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Text to picture. `p` must be validated; `noise` [B, 4, H/8, W/8] replaces the seeded noise."""
    if ctx.model.cfg.variant != "base":
        raise ValueError(f"txt2img needs a base model; this is an {ctx.model.cfg.variant} model")
    down = ctx.model.vae.cfg.downscale
    shape = (ctx.model.vae.cfg.z_channels, p.height // down, p.width // down)
    generators = generators_for([p.seed + i for i in range(p.batch_size)])
    seeded = initial_noise(generators, shape)
    if noise is not None:
        if tuple(noise.shape) != (p.batch_size, *shape):
            raise ValueError(f"explicit noise has shape {tuple(noise.shape)}, expected {(p.batch_size, *shape)}")
        seeded = noise.float()
    cond = encode_prompt(ctx.model, ctx.tokenizer, [p.prompt] * p.batch_size, p.clip_skip)
    uncond = encode_prompt(ctx.model, ctx.tokenizer, [p.negative_prompt] * p.batch_size, p.clip_skip)
    denoiser = CFGDenoiser(ctx.denoiser(), cond, uncond, p.cfg_scale, rescale=p.guidance_rescale)
    sigmas = sampler_sigmas(ctx.schedule, p)
    latents = denoise(
        denoiser, seeded.to(ctx.device), sigmas, p.sampler_spec, generators,
        callback=callback, options=p.sampler_options(),
        inputs={"model_schedule": ctx.schedule, "seeds": [p.seed + i for i in range(p.batch_size)]},
    )
    return decode(ctx.model, latents)
