"""A small picture analyser for the shapes world: background colour, shape colour, where the shape sits.

Each pixel is named by the nearest colour of the data set's palette (RGB distance); pixels far
from every palette colour (blends at edges, noise) are left unnamed. The background is the most
common name along the picture's border; the foreground is every named pixel of another name,
and its colour the most common among them. This reads generated pictures the way a person
would describe them ("a red circle on a blue background"), which is what the semantic tests need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import COLOURS

NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in NAMES], dtype=np.float32)  # [K, 3]
UNNAMED = -1


@dataclass(frozen=True)
class Description:
    background: str | None
    foreground: str | None  # None when (almost) no pixel differs from the background
    foreground_share: float  # fraction of the picture covered by the foreground
    centre: tuple[float, float] | None  # foreground centroid, (x, y) as fractions of width and height
    shares: dict[str, float]  # fraction of the picture named by each colour


def name_pixels(picture: Image.Image | np.ndarray, max_distance: float = 70.0) -> np.ndarray:
    """[H, W] palette indices (UNNAMED where no palette colour is within max_distance)."""
    rgb = np.asarray(picture.convert("RGB") if isinstance(picture, Image.Image) else picture, dtype=np.float32)
    dist = np.linalg.norm(rgb[:, :, None, :] - _PALETTE[None, None], axis=-1)  # [H, W, K]
    names = dist.argmin(-1)
    names[dist.min(-1) > max_distance] = UNNAMED
    return names


def describe(picture: Image.Image | np.ndarray, min_foreground: float = 0.01) -> Description:
    names = name_pixels(picture)
    h, w = names.shape
    shares = {n: float((names == k).mean()) for k, n in enumerate(NAMES)}
    border = np.concatenate([names[:2].ravel(), names[-2:].ravel(), names[:, :2].ravel(), names[:, -2:].ravel()])
    border = border[border != UNNAMED]
    if border.size == 0:
        return Description(None, None, 0.0, None, shares)
    bg = int(np.bincount(border, minlength=len(NAMES)).argmax())
    fg_mask = (names != bg) & (names != UNNAMED)
    share = float(fg_mask.mean())
    if share < min_foreground:
        return Description(NAMES[bg], None, share, None, shares)
    fg = int(np.bincount(names[fg_mask], minlength=len(NAMES)).argmax())
    ys, xs = np.nonzero(fg_mask)
    centre = (float(xs.mean() + 0.5) / w, float(ys.mean() + 0.5) / h)
    return Description(NAMES[bg], NAMES[fg], share, centre, shares)


def region_share(picture: Image.Image | np.ndarray, colour: str, region: np.ndarray) -> float:
    """Fraction of the pixels inside boolean `region` [H, W] that are named `colour`."""
    names = name_pixels(picture)
    return float((names[region] == NAMES.index(colour)).mean())
