"""What every sampler shares: the signature's types, per-image noise, progress, and SamplerSpec.

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

Callback = Callable[[int, int, torch.Tensor], None]  # (step index, total steps, current x0 estimate)
Generators = list[torch.Generator] | None


def randn_like(x: torch.Tensor, generator: list[torch.Generator] | None) -> torch.Tensor:
    """Noise like x, image i drawn on the CPU in float32 from generator[i]."""
    if generator is None:
        raise ValueError("this sampler adds fresh noise: pass one torch.Generator per image")
    if len(generator) != x.shape[0]:
        raise ValueError(f"need one generator per image: {len(generator)} for a batch of {x.shape[0]}")
    noise = [torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generator]
    return torch.stack(noise).to(device=x.device, dtype=x.dtype)


class SamplingStopped(Exception):
    """Raised by a callback to end sampling early: the pipeline then uses the last x0 estimate,
    as the web UI's "interrupt" and "skip" do (the server's way to stop between steps)."""


def report(callback: Callback | None, i: int, n: int, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback(i, n, denoised)


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # display name, as the popular web UI shows it
    aliases: tuple[str, ...]
    fn: Callable[..., torch.Tensor]
    default_schedule: str  # what "automatic" means for this sampler
    # VP-native samplers (DDIM) start from unit-variance noise x_T, i.e. noise * sqrt(1 + sigma^2)
    # in sigma space; k-diffusion samplers start from noise * sigma.
    vp_start: bool = False
    options: tuple[str, ...] = field(default=())  # user options it accepts (eta, s_noise, ...)
    # What the pipeline must hand it besides the signature: "model_schedule" (the ModelSchedule, for
    # samplers that work on trained timesteps) and "seeds" (per-image seeds, for Brownian-tree noise).
    inputs: tuple[str, ...] = field(default=())
    # The web UI builds steps+1 sigmas and drops the next-to-last one for samplers whose last
    # step would otherwise be wasted (DPM2, DPM2 a, DPM++ 3M SDE).
    discard_penultimate_sigma: bool = False
    schedules: tuple[str, ...] | None = None  # the schedules it can walk; None = all of them
    # Two model calls per step: the web UI measures prompt-editing schedules in 2 x steps for these.
    second_order: bool = False

    def initial_noise_scale(self, sigma: float) -> float:
        return math.sqrt(1 + sigma**2) if self.vp_start else sigma
