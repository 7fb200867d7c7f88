"""Samplers defined on the model's trained timesteps (DDIM family), written in sigma space."""

from __future__ import annotations

import torch

from .common import Callback, Generators, SamplerSpec
from .denoiser import Denoise
from .k_samplers import sample_euler, sample_euler_ancestral


def sample_ddim(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
    callback: Callback | None = None, eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2020). In sigma space its step is an ancestral Euler step whose noise
    sigma_up = eta * sqrt(s'^2 (s^2 - s'^2) / s^2) is exactly DDIM's sigma_t rescaled, so eta 0
    is the deterministic DDIM and eta 1 is DDPM-like."""
    if eta == 0:
        return sample_euler(denoiser, x, sigmas, callback=callback)
    return sample_euler_ancestral(denoiser, x, sigmas, generator=generator, callback=callback, eta=eta)


SPECS: tuple[SamplerSpec, ...] = (
    SamplerSpec("DDIM", ("ddim",), sample_ddim, "ddim", vp_start=True, options=("eta",)),
)
