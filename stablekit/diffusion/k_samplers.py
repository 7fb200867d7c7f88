"""Samplers in sigma space following k-diffusion (Crowson), as the popular web UI runs them."""

from __future__ import annotations

import math

import torch

from .common import Callback, Generators, SamplerSpec, randn_like, report
from .denoiser import Denoise


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split a step into a deterministic part down to sigma_down and fresh noise sigma_up."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def sample_euler(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler method on the probability-flow ODE (Karras et al. 2022, alg. 2 without churn)."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
        report(callback, i, len(s) - 1, denoised)
    return x


def sample_euler_ancestral(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators,
    callback: Callback | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion "Euler a")."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        down, up = ancestral_step(s[i], s[i + 1], eta)
        x = x + (x - denoised) / s[i] * (down - s[i])
        if up > 0:
            x = x + randn_like(x, generator) * (s_noise * up)
        report(callback, i, len(s) - 1, denoised)
    return x


def sample_dpmpp_2m(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022: second-order multistep in lambda = -log sigma."""
    s = sigmas.tolist()
    old_denoised = None
    h_last = 0.0
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        if s[i + 1] == s[i]:  # a repeated sigma (the DDIM schedule at 1000 steps) is no step
            pass
        elif s[i + 1] == 0:  # last step to zero: the estimate itself
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            if old_denoised is None:
                d = denoised
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
            h_last = h
        if s[i + 1] != s[i]:
            old_denoised = denoised
        report(callback, i, len(s) - 1, denoised)
    return x


SPECS: tuple[SamplerSpec, ...] = (
    SamplerSpec("Euler", ("euler", "k_euler"), sample_euler, "uniform"),
    SamplerSpec("Euler a", ("euler_a", "euler_ancestral", "k_euler_a"), sample_euler_ancestral, "uniform",
                options=("eta", "s_noise")),
    SamplerSpec("DPM++ 2M", ("dpmpp_2m", "k_dpmpp_2m"), sample_dpmpp_2m, "karras"),
)
