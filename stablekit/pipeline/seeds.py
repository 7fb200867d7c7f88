"""The first noise of each image: its seed's, optionally moved toward a variation seed's and drawn as
for another picture size (the web UI's `ImageRNG.first`, so a seed, subseed and strength give its noise).

Every image's generator makes exactly one draw at the full latent shape here, whatever the options,
so the sampler's later draws (ancestral noise) continue from the same state as without them.
"""

from __future__ import annotations

import torch

from ..params import GenerationParams


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two [C, H, W] noises, as the web UI writes it.

    The angle is taken per (channel, column): norms and dot products run over H (dim 1). Nearly
    parallel noises fall back to a linear mix whose weights are swapped (low * t + high * (1 - t)),
    a quirk kept because it decides the picture.
    """
    low_unit = low / low.norm(dim=1, keepdim=True)
    high_unit = high / high.norm(dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)  # [C, W]
    if dot.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(1) * high


def _draw(seed: int, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 standard normal noise: from `generator`, else from a fresh generator of `seed`."""
    return torch.randn(shape, generator=generator or torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def _paste_centred(small: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """`small` [C, h, w] put in the middle of `big` [C, H, W]; cropped where it is the larger."""
    dx, dy = (big.shape[2] - small.shape[2]) // 2, (big.shape[1] - small.shape[1]) // 2
    w = small.shape[2] if dx >= 0 else small.shape[2] + 2 * dx
    h = small.shape[1] if dy >= 0 else small.shape[1] + 2 * dy
    tx, ty, sx, sy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
    out = big.clone()
    out[:, ty:ty + h, tx:tx + w] = small[:, sy:sy + h, sx:sx + w]
    return out


def first_noise(p: GenerationParams, generators: list[torch.Generator], shape: tuple[int, int, int],
                downscale: int = 8) -> torch.Tensor:
    """[B, C, h, w] float32: image i's noise from generators[i] (seeded p.image_seeds[i]).

    With a variation strength, slerped toward the noise of p.image_subseeds[i]. With seed_resize_from,
    both are drawn at that picture's latent size and pasted into the middle of a full-size draw.
    """
    resize = p.seed_resize_from
    small = shape if resize is None else (shape[0], resize[1] // downscale, resize[0] // downscale)
    out = []
    for seed, subseed, generator in zip(p.image_seeds, p.image_subseeds, generators):
        noise = _draw(seed, small, None if small != shape else generator)
        if p.subseed_strength:
            noise = slerp(p.subseed_strength, noise, _draw(subseed, small))
        if small != shape:
            noise = _paste_centred(noise, _draw(seed, shape, generator))
        out.append(noise)
    return torch.stack(out)


def variation_infotext(p: GenerationParams, index: int) -> dict[str, object]:
    """The web UI's infotext keys for image `index`: only for options that are in use."""
    resize = p.seed_resize_from
    return {
        "Variation seed": p.image_subseeds[index] if p.subseed_strength else None,
        "Variation seed strength": p.subseed_strength or None,
        "Seed resize from": f"{resize[0]}x{resize[1]}" if resize else None,
    }
