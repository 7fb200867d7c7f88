"""Brownian-tree noise for the SDE samplers, as the popular web UI draws it.

The web UI hands k-diffusion's SDE samplers a `BrownianTreeNoiseSampler(x, sigma_min, sigma_max,
seed=[per-image seeds])`: one `torchsde.BrownianTree` per image, seeded with that image's seed,
spanning [smallest nonzero sigma, largest sigma] of the schedule, queried in sigma itself (identity
transform). The noise for a step sigma -> sigma_next is the Brownian increment W(sigma_next) - W(sigma)
over sqrt(|sigma_next - sigma|): standard normal, and the same whatever the step sizes around it, so a
batch image equals the same seed run alone and noise stays coherent across step counts.

Here the trees always live on the CPU in float32 (house rule: seeds reproduce across devices);
torchsde is imported only when an SDE sampler runs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

NoiseSampler = Callable[[float, float], torch.Tensor]  # (sigma, sigma_next) -> unit-variance noise like x


class BrownianNoise:
    """Unit-variance Brownian increments [B, ...], image i from a BrownianTree seeded with seeds[i]."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seeds: list[int]):
        try:
            import torchsde
        except ImportError:
            raise ValueError("the DPM++ SDE samplers need torchsde for their Brownian-tree noise: "
                             "pip install 'stablekit[sde]' (or pip install torchsde)") from None
        if len(seeds) != x.shape[0]:
            raise ValueError(f"need one seed per image: {len(seeds)} for a batch of {x.shape[0]}")
        if not 0 <= sigma_min <= sigma_max:
            raise ValueError(f"Brownian noise needs 0 <= sigma_min <= sigma_max, got {sigma_min} and {sigma_max}")
        self.device, self.dtype = x.device, x.dtype
        w0 = torch.zeros(x.shape[1:], dtype=torch.float32)  # one image's shape, CPU float32
        # torchsde takes the times as floats and the seed as its `entropy`.
        self.trees = [torchsde.BrownianTree(float(sigma_min), w0, float(sigma_max), entropy=int(s)) for s in seeds]

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        a, b = sorted((float(sigma), float(sigma_next)))
        sign = 1.0 if sigma_next > sigma else -1.0  # W(sigma_next) - W(sigma), walking down in sigma
        with warnings.catch_warnings():  # torchsde rounds the tree's ends to 1e-6 and warns when a query
            warnings.filterwarnings("ignore", "Should have", UserWarning)  # at an end falls outside; it clamps
            w = torch.stack([tree(a, b) for tree in self.trees]) * sign  # [B, ...] float32
        return (w / math.sqrt(b - a)).to(device=self.device, dtype=self.dtype)


def brownian_noise(x: torch.Tensor, sigmas: torch.Tensor, seeds: list[int] | None) -> BrownianNoise:
    """The web UI's tree for this schedule: over [smallest nonzero sigma, largest sigma]."""
    if seeds is None:
        raise ValueError("the DPM++ SDE samplers draw Brownian-tree noise from the images' seeds: pass seeds=")
    positive = sigmas[sigmas > 0]  # empty, or one sigma, when the run has no noisy step: a tree that is never asked
    sigma_min = float(positive.min()) if len(positive) else 0.0
    return BrownianNoise(x, sigma_min, float(sigmas.max()), seeds)
