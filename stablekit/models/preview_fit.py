"""Previews for latent formats that have no published preview map.

SD 1.x / 2.x latents have the web UI's "Approx cheap" matrix (`config.SD_PREVIEW_RGB`). A model with
its own latent space (the shapes demo model, the x4 upscaler's VAE, a home-trained one) would show
unrelated colours with it, so at load one of two things is chosen:
- a small decoder (under a tenth of SD's) previews with the decoder itself: exact, and a few
  milliseconds (the demo model's: 10 ms for 8x8 latents on one core). Its latent space is too far
  from linear for a map: the best affine map, fitted on its own final latents, is still 18 levels
  off in mean colour;
- otherwise an affine map is fitted: synthetic pictures (flat colours, boxes, discs, gradients) are
  encoded, their latents decoded again, and a least-squares map with a bias goes from each latent
  pixel to the mean colour of the decoded pixels above it.
"""

from __future__ import annotations

import torch

from dataclasses import replace

from ..config import VAEConfig
from .vae import AutoencoderKL

SD_LATENT_FORMAT = VAEConfig()  # the architecture and scale the published matrix belongs to
SMALL_DECODER = 5_000_000  # parameters; SD's decoder has 49.5 M


def has_known_preview(cfg: VAEConfig) -> bool:
    """Whether the latent format is SD's (same latent channels, depth and scale), whose published
    preview matrix is the config's default."""
    sd = SD_LATENT_FORMAT
    return (cfg.z_channels, cfg.ch_mult, cfg.scale_factor, cfg.shift_factor) == (
        sd.z_channels, sd.ch_mult, sd.scale_factor, sd.shift_factor)


def synthetic_pictures(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """[count, 3, size, size] in [-1, 1]: a flat background with a box or a disc, or a gradient."""
    g = torch.Generator("cpu").manual_seed(seed)
    rand = lambda *shape: torch.rand(shape, generator=g)  # noqa: E731 - one-line local helper
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    pictures = []
    for i in range(count):
        background, colour = rand(3, 1, 1), rand(3, 1, 1)
        cy, cx, r = rand(3).tolist()
        if i % 3 == 0:
            inside = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt() < 0.15 + 0.3 * r
        elif i % 3 == 1:
            inside = ((ys - cy).abs() < 0.1 + 0.25 * r) & ((xs - cx).abs() < 0.1 + 0.25 * r)
        else:  # a gradient between the two colours
            w = (xs * cx + ys * (1 - cx)).clamp(0, 1)
            pictures.append(background * (1 - w) + colour * w)
            continue
        pictures.append(torch.where(inside, colour, background))
    return torch.stack(pictures) * 2 - 1


@torch.inference_mode()
def fit_preview(vae: AutoencoderKL, count: int = 24) -> tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]:
    """(map [z][3], bias [3]) from the sampler's scaled latent to colours in [-1, 1]."""
    cfg = vae.cfg
    param = next(vae.parameters())
    f = cfg.downscale
    pictures = synthetic_pictures(count, 8 * f).to(device=param.device, dtype=param.dtype)
    mean, _ = vae.encode(pictures)
    decoded = vae.decode(mean).float().clamp(-1, 1)
    colours = torch.nn.functional.avg_pool2d(decoded, f)  # [B, 3, h, w]: the decoded colour over each latent pixel
    latents = (mean.float() - cfg.shift_factor) * cfg.scale_factor
    x = latents.permute(0, 2, 3, 1).reshape(-1, cfg.z_channels).cpu()
    y = colours.permute(0, 2, 3, 1).reshape(-1, 3).cpu()
    design = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, y.double()).solution.float()  # [z + 1, 3]
    matrix = tuple(tuple(round(v, 4) for v in row) for row in solution[:-1].tolist())
    return matrix, tuple(round(v, 4) for v in solution[-1].tolist())


def with_preview(cfg: VAEConfig, vae: AutoencoderKL) -> tuple[VAEConfig, str | None]:
    """The VAE config with the preview method its latent format needs, and a note when it changed."""
    if has_known_preview(cfg):
        return cfg, None
    size = sum(p.numel() for p in vae.decoder.parameters())
    if size < SMALL_DECODER:
        return replace(cfg, preview_decoder=True), f"previews: the VAE's own decoder ({size / 1e6:.1f} M parameters)"
    matrix, bias = fit_preview(vae)
    return replace(cfg, preview_rgb=matrix, preview_bias=bias), "previews: a colour map fitted from the VAE"
