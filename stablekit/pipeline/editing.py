"""Pictures around the latent work: the canvas a task works on, and the shared finishing step.

A task's `prepare` brings its pictures to the working size (fit, mask blur, the "only masked"
crop) and says how results go back; `finish` decodes the latents and puts them back (paste-back
outside the mask, crop-back into the whole picture). Outpainting canvases are made here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..images import fit_picture, to_tensor
from ..masks import fill_hole, gaussian_blur, mask_box, mask_from_picture, paste_back
from ..models import StableDiffusionModel
from ..params import GenerationParams
from .steps import decode


@dataclass
class Canvas:
    """What a task samples from, at width x height, and how its results go back.

    picture / mask: the working picture [1, 3, H, W] and soft mask [1, 1, H, W] (1 = repaint).
    paste_into / paste_mask: outside paste_mask the result's pixels are paste_into's (at the size
    results have after crop-back's resize). whole / box: the picture the result is put back into
    and where (left, top, right, bottom); None: the result is the picture.
    """

    picture: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    paste_into: torch.Tensor | None = None
    paste_mask: torch.Tensor | None = None
    whole: torch.Tensor | None = None
    box: tuple[int, int, int, int] | None = None
    depth: torch.Tensor | None = None  # depth2img: the depth map [1, 1, h, w] (larger = nearer)
    latent_crop: tuple[int, int] | None = None  # upscale: (rows, columns) of the latent the result keeps


def finish(model: StableDiffusionModel, canvas: Canvas, latents: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Latents [B, 4, h, w] (None: nothing was sampled, the picture is kept) -> pictures [B, 3, H, W]."""
    pictures = canvas.picture.expand(batch, -1, -1, -1).clone() if latents is None else decode(model, latents)
    if canvas.box is not None:
        left, top, right, bottom = canvas.box
        pictures = _resize(pictures, right - left, bottom - top)
    if canvas.paste_mask is not None:
        pictures = paste_back(pictures, canvas.paste_into, canvas.paste_mask)
    if canvas.box is not None:
        out = canvas.whole.expand(batch, -1, -1, -1).clone()
        out[..., top:bottom, left:right] = pictures
        pictures = out
    return pictures


def fitted_canvas(image: Image.Image, p: GenerationParams, device: torch.device) -> Canvas:
    """img2img: the picture fitted to width x height with the resize mode."""
    return Canvas(picture=to_tensor(fit_picture(image, p.width, p.height, p.resize_mode)).to(device))


def inpaint_canvas(
    image: Image.Image, mask: Image.Image, p: GenerationParams, device: torch.device, resize_mask: bool = False
) -> Canvas:
    """Inpainting as the web UI does: the whole picture at width x height, or ("masked" area) a box
    around the mask generated at width x height and put back into the picture at its own size."""
    raw = _mask_tensor(image, mask, p, resize_mask)
    paste = p.paste_back
    if p.inpaint_area == "whole":
        picture = to_tensor(fit_picture(image, p.width, p.height, p.resize_mode)).to(device)
        soft = gaussian_blur(_fit(raw, p.width, p.height, p.resize_mode), p.mask_blur).to(device)
        return Canvas(picture, soft, picture if paste else None, soft if paste else None)
    full = to_tensor(image).to(device)  # [1, 3, H, W] at the picture's own size
    soft_full = gaussian_blur(raw, p.mask_blur).to(device)
    left, top, right, bottom = mask_box(soft_full > 0, p.inpaint_padding, p.width, p.height)
    crop, crop_mask = full[..., top:bottom, left:right], soft_full[..., top:bottom, left:right]
    return Canvas(_resize(crop, p.width, p.height), _resize(crop_mask, p.width, p.height),
                  crop if paste else None, crop_mask if paste else None, full, (left, top, right, bottom))


def _mask_tensor(image: Image.Image, mask: Image.Image, p: GenerationParams, resize_mask: bool) -> torch.Tensor:
    """The mask at the picture's own size, [1, 1, H, W], 1 = repaint (inverted if asked)."""
    if mask.size != image.size:
        if not resize_mask:
            raise ValueError(f"the mask is {mask.width}x{mask.height} but the picture is {image.width}x{image.height}; "
                             "give a mask of the same size, or resize it (--resize-mask, resize_mask=True)")
        mask = mask.resize(image.size, Image.BILINEAR)
    return mask_from_picture(mask, p.invert_mask)


def _fit(values: torch.Tensor, width: int, height: int, mode: str) -> torch.Tensor:
    """Fit a one-channel [1, 1, H, W] map with the same resize mode as the picture."""
    grey = Image.fromarray((values[0, 0].numpy() * 255).round().astype(np.uint8))
    return to_tensor(fit_picture(grey, width, height, mode))[:, :1]


def _resize(pictures: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] -> [B, C, height, width], with antialiasing when shrinking."""
    return F.interpolate(pictures, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def _outpaint_sides(image: Image.Image, left: int, right: int, top: int, bottom: int) -> tuple[int, int, int, int]:
    """Each side grown by at least the asked amount, rounded up so the canvas sides are multiples of 8."""
    if min(left, right, top, bottom) < 0 or left + right + top + bottom == 0:
        raise ValueError("outpainting needs a positive --left, --right, --top or --bottom")
    width, height = image.width + left + right, image.height + top + bottom
    extra_w, extra_h = -width % 8, -height % 8  # round up, adding the extra where something grows
    right += extra_w if right or not left else 0
    left += extra_w if left and not right else 0
    bottom += extra_h if bottom or not top else 0
    top += extra_h if top and not bottom else 0
    return left, right, top, bottom


def outpaint_size(image: Image.Image, left: int, right: int, top: int, bottom: int) -> tuple[int, int]:
    """The outpainting canvas's width and height."""
    left, right, top, bottom = _outpaint_sides(image, left, right, top, bottom)
    return image.width + left + right, image.height + top + bottom


def outpaint_canvas(
    image: Image.Image, left: int, right: int, top: int, bottom: int, fill: str = "edges"
) -> tuple[Image.Image, Image.Image]:
    """A larger canvas with the picture in it and a mask of the new area (white).

    Each side grows by at least the asked amount, rounded up so both sides of the canvas are
    multiples of 8. The new area is filled with the picture's edge colours ("edges") or noise.
    """
    left, right, top, bottom = _outpaint_sides(image, left, right, top, bottom)
    width, height = image.width + left + right, image.height + top + bottom
    mask = Image.new("L", (width, height), 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    canvas = Image.new("RGB", (width, height))
    canvas.paste(image.convert("RGB"), (left, top))
    hole = to_tensor(mask)[:, :1]
    if fill == "edges":
        filled = fill_hole(to_tensor(canvas), hole)
    elif fill == "noise":
        rng = torch.Generator().manual_seed(0)
        filled = to_tensor(canvas) * (1 - hole) + torch.rand((1, 3, height, width), generator=rng) * hole
    else:
        raise ValueError(f"unknown outpainting fill '{fill}'; choose edges or noise")
    arr = (filled[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr), mask
