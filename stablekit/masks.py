"""Inpainting masks: reading, blurring, latent-size masks, hole filling and paste-back.

Convention: mask value 1 (white) repaints, 0 (black) keeps. Tensors are [1, 1, H, W] float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def mask_from_picture(mask: Image.Image, invert: bool = False) -> torch.Tensor:
    """Greyscale, RGB, or the alpha channel of an RGBA picture (transparent = repaint) -> [1, 1, H, W]."""
    if mask.mode in ("RGBA", "LA") or (mask.mode == "P" and "transparency" in mask.info):
        values = 255 - np.asarray(mask.convert("RGBA"), dtype=np.float32)[..., 3]
    else:
        values = np.asarray(mask.convert("L"), dtype=np.float32)
    out = torch.from_numpy(values / 255.0)[None, None]
    return 1 - out if invert else out


def gaussian_blur(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with the web UI's kernel size 2*int(2.5*sigma + 0.5) + 1 and mirrored edges."""
    if sigma <= 0:
        return mask
    radius = int(2.5 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    pad = min(radius, mask.shape[-1] - 1, mask.shape[-2] - 1)  # reflect padding needs a wider picture
    out = F.pad(mask, (radius, radius, 0, 0), mode="reflect" if pad == radius else "replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = F.pad(out, (0, 0, radius, radius), mode="reflect" if pad == radius else "replicate")
    return F.conv2d(out, kernel.view(1, 1, -1, 1)).clamp(0, 1)


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel mask -> binary mask at latent size [1, 1, h, w] (nearest, then rounded), as diffusers does."""
    return (F.interpolate(mask, size=size, mode="nearest") >= 0.5).float()


def fill_hole(picture: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paint the masked region with the surrounding colours, coarse to fine ("fill" masked content).

    Known pixels are spread by ever smaller blurs of the premultiplied picture; each pass only
    paints where the previous passes left gaps, so near the edge the closest colours win.
    """
    keep = (mask < 0.5).float()  # [1, 1, H, W]
    colour = picture * keep
    out = picture.clone()
    for sigma in (64, 16, 4, 2, 1):
        s = min(sigma, max(1, min(picture.shape[-2:]) // 4))
        weight = gaussian_blur(keep, s)
        spread = torch.cat([gaussian_blur(colour[:, c : c + 1], s) for c in range(3)], 1) / weight.clamp(min=1e-6)
        take = (weight > 1e-3).float() * (1 - keep)
        out = out * (1 - take) + spread * take
    return out.clamp(0, 1)


def paste_back(generated: torch.Tensor, original: torch.Tensor, soft_mask: torch.Tensor) -> torch.Tensor:
    """Original pixels where the (blurred) mask is 0, generated where it is 1, alpha-blended between.

    Where the mask is exactly 0 the result is the original value itself, so 8-bit pixels round-trip.
    """
    return torch.where(soft_mask == 0, original, original * (1 - soft_mask) + generated * soft_mask)


def mask_box(mask: torch.Tensor, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Box (left, top, right, bottom) around the mask plus padding, grown to the width:height aspect
    and kept inside the picture ("only masked" inpainting)."""
    rows = torch.nonzero(mask[0, 0].amax(dim=1) > 0).flatten()
    cols = torch.nonzero(mask[0, 0].amax(dim=0) > 0).flatten()
    full_h, full_w = mask.shape[-2:]
    if len(rows) == 0:
        return 0, 0, full_w, full_h
    left, right = max(0, int(cols[0]) - padding), min(full_w, int(cols[-1]) + 1 + padding)
    top, bottom = max(0, int(rows[0]) - padding), min(full_h, int(rows[-1]) + 1 + padding)
    want = width / height
    w, h = right - left, bottom - top
    if w / h < want:  # too narrow: widen around the centre
        w = min(full_w, math.ceil(h * want))
    else:
        h = min(full_h, math.ceil(w / want))
    cx, cy = (left + right) / 2, (top + bottom) / 2
    left = int(min(max(0, round(cx - w / 2)), full_w - w))
    top = int(min(max(0, round(cy - h / 2)), full_h - h))
    return left, top, left + w, top + h
