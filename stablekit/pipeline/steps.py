"""The shared steps every task composes: prompt -> cond, seed -> noise, sampling, decoding."""

from __future__ import annotations

import math

import torch

from ..diffusion.denoiser import Denoise
from ..diffusion.common import SamplingStopped
from ..diffusion.samplers import Callback, SamplerSpec
from ..models import StableDiffusionModel
from ..models.tokenizer import CLIPTokenizer


@torch.inference_mode()
def encode_prompt(
    model: StableDiffusionModel, tokenizer: CLIPTokenizer, prompts: list[str], clip_skip: int = 1
) -> torch.Tensor:
    """prompts (B) -> text embeddings [B, 77, C] in the model's dtype. Tokens past 75 are dropped."""
    device = next(model.text_encoder.parameters()).device
    ids = tokenizer(prompts).to(device)  # [B, 77]
    return model.text_encoder(ids, clip_skip=clip_skip)


def generators_for(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: the same seed gives the same noise on every device."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def initial_noise(generators: list[torch.Generator], shape: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, h, w] float32 standard normal noise, image i drawn from generator i."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])


@torch.inference_mode()
def denoise(
    denoiser: Denoise,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    spec: SamplerSpec,
    generators: list[torch.Generator],
    *,
    start: torch.Tensor | None = None,
    callback: Callback | None = None,
    options: dict | None = None,
    inputs: dict | None = None,
) -> torch.Tensor:
    """Run `spec` over `sigmas` from `start` (default zeros) noised to sigmas[0].

    `options` are the user's sampler options; `inputs` what the pipeline can offer (model_schedule,
    seeds), of which the sampler gets those its spec names.

    Returns the variance-preserving latent at the last sigma (x / sqrt(1 + sigma^2)), which is
    the clean latent when the schedule ends at zero and DDIM's x at t=0 otherwise. A callback that
    raises SamplingStopped ends sampling there and the last x0 estimate is returned instead.
    """
    if start is None:
        x = noise * spec.initial_noise_scale(float(sigmas[0]))
    else:  # a picture's latent noised to sigmas[0]: x = x0 + sigma * noise for every sampler
        x = start + noise * float(sigmas[0])
    given = {name: (inputs or {})[name] for name in spec.inputs}
    last: list[torch.Tensor] = []

    def watch(i: int, n: int, x0: torch.Tensor) -> None:
        last[:] = [x0]  # kept first, so a callback that stops sampling leaves an estimate behind
        if callback is not None:
            callback(i, n, x0)

    try:
        x = spec.fn(denoiser, x, sigmas, generator=generators, callback=watch, **(options or {}), **given)
    except SamplingStopped:
        if not last:
            raise
        return last[0].float()  # the clean-latent estimate of the step the callback stopped at
    return x / math.sqrt(1 + float(sigmas[-1]) ** 2)


@torch.inference_mode()
def encode_picture(model: StableDiffusionModel, pictures: torch.Tensor) -> torch.Tensor:
    """pictures [B, 3, H, W] in [0, 1] -> scaled latents [B, 4, H/8, W/8] float32.

    The latent distribution's mean is used, not a sample: deterministic, and the VAE's posterior
    is so narrow that a sample differs by about 1e-3.
    """
    vae = model.vae
    param = next(vae.parameters())
    mean, _ = vae.encode((pictures * 2 - 1).to(device=param.device, dtype=param.dtype))
    return mean.float() * vae.cfg.scale_factor


@torch.inference_mode()
def decode(model: StableDiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """scaled latents [B, 4, h, w] -> pictures [B, 3, 8h, 8w] float32 in [0, 1]."""
    vae = model.vae
    dtype = next(vae.parameters()).dtype
    pictures = vae.decode((latents / vae.cfg.scale_factor).to(dtype)).float()
    return ((pictures + 1) / 2).clamp(0, 1)
