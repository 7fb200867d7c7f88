"""What every sampler shares: the signature's types, per-image noise and progress.

Signature: `sampler(denoiser, x, sigmas, *, generator, callback, **options) -> x`, with
x = x0 + sigma * noise at sigmas[0] on entry and the sample at sigmas[-1] on exit
(k-diffusion's conventions). Fresh noise comes from `generator`: one CPU torch.Generator
per batch image, continuing the stream that drew that image's initial noise, so a batch
image equals the same seed run alone.
"""

from __future__ import annotations

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
