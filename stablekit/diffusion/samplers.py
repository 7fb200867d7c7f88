"""Samplers: pure functions walking a denoiser down a sigma schedule.

Signature: `sampler(denoiser, x, sigmas, *, generator, callback, **options) -> x`, with
x = x0 + sigma * noise at sigmas[0] on entry and the sample at sigmas[-1] on exit
(k-diffusion's conventions). Fresh noise comes from `generator`: one CPU torch.Generator
per batch image, continuing the stream that drew that image's initial noise, so a batch
image equals the same seed run alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .denoiser import Denoise
from .schedule import canonical

Callback = Callable[[int, int, torch.Tensor], None]  # (step index, total steps, current x0 estimate)


def randn_like(x: torch.Tensor, generator: list[torch.Generator] | None) -> torch.Tensor:
    """Noise like x, image i drawn on the CPU in float32 from generator[i]."""
    if generator is None:
        raise ValueError("this sampler adds fresh noise: pass one torch.Generator per image")
    if len(generator) != x.shape[0]:
        raise ValueError(f"need one generator per image: {len(generator)} for a batch of {x.shape[0]}")
    noise = [torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generator]
    return torch.stack(noise).to(device=x.device, dtype=x.dtype)


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split a step into a deterministic part down to sigma_down and fresh noise sigma_up."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def _progress(callback: Callback | None, i: int, n: int, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback(i, n, denoised)


Generators = list[torch.Generator] | None


def sample_euler(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler method on the probability-flow ODE (Karras et al. 2022, alg. 2 without churn)."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
        _progress(callback, i, len(s) - 1, denoised)
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
        _progress(callback, i, len(s) - 1, denoised)
    return x


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
        _progress(callback, i, len(s) - 1, denoised)
    return x


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # display name, as the popular web UI shows it
    aliases: tuple[str, ...]
    fn: Callable[..., torch.Tensor]
    default_schedule: str  # what "automatic" means for this sampler
    # VP-native samplers (DDIM) start from unit-variance noise x_T, i.e. noise * sqrt(1 + sigma^2)
    # in sigma space; k-diffusion samplers start from noise * sigma.
    vp_start: bool = False
    options: tuple[str, ...] = field(default=())  # accepted keyword options

    def initial_noise_scale(self, sigma: float) -> float:
        return math.sqrt(1 + sigma**2) if self.vp_start else sigma


SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("Euler", ("euler", "k_euler"), sample_euler, "uniform"),
    SamplerSpec("Euler a", ("euler_a", "euler_ancestral", "k_euler_a"), sample_euler_ancestral, "uniform",
                options=("eta", "s_noise")),
    SamplerSpec("DPM++ 2M", ("dpmpp_2m", "k_dpmpp_2m"), sample_dpmpp_2m, "karras"),
    SamplerSpec("DDIM", ("ddim",), sample_ddim, "ddim", vp_start=True, options=("eta",)),
)


def find_sampler(name: str) -> tuple[SamplerSpec, str | None]:
    """Display name or alias -> (spec, schedule named in the sampler name, e.g. "DPM++ 2M Karras")."""
    key = canonical(name)
    for spec in SAMPLERS:
        if key in {canonical(spec.name), *spec.aliases}:
            return spec, None
    for spec in SAMPLERS:  # old web-UI names carry the schedule: "DPM++ 2M Karras"
        for label in ("karras", "uniform", "ddim"):
            if key in {f"{a}_{label}" for a in (canonical(spec.name), *spec.aliases)}:
                return spec, label
    names = ", ".join(f"'{s.name}' ({'/'.join(s.aliases[:1])})" for s in SAMPLERS)
    raise ValueError(f"unknown sampler '{name}'; choose from {names}")
