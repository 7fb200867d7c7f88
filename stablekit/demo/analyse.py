"""A small picture analyser for the shapes world: background colour, shape colour and kind, where it sits.

Each pixel is named by the nearest colour of the data set's palette (RGB distance); pixels far
from every palette colour (blends at edges, noise) are left unnamed. The background is the most
common name along the picture's border; the foreground is every named pixel of another name,
and its colour the most common among them. This reads generated pictures the way a person
would describe them ("a red circle on a blue background"), which is what the semantic tests need.

The shape is read from the largest connected piece of the foreground colour by four measures: a
hole of background inside it (ring), solidity, its area over the convex hull's (star), extent,
its area over the bounding box's (square 1, circle pi/4, triangle and diamond 1/2), and the row
where it is widest (a triangle's is at its base, a diamond's in the middle). The place is the
nearest of the data set's nine places to the piece's centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import COLOURS, PLACES

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
    shape: str | None = None  # one of shapes.SHAPES, read from the largest foreground piece
    place: str | None = None  # the nearest of shapes.PLACES to that piece's centre


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
    piece = largest_piece(names == fg)
    py, px = np.nonzero(piece)
    piece_centre = (float(px.mean() + 0.5) / w, float(py.mean() + 0.5) / h)
    return Description(NAMES[bg], NAMES[fg], share, centre, shares, classify_shape(piece, names == bg),
                       nearest_place(piece_centre))


def largest_piece(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask [H, W] (flood fill; pictures are small)."""
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, region = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask, dtype=bool)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of pixel squares' corners (monotone chain, then the shoelace formula)."""
    corners = np.concatenate([points + d for d in ((0, 0), (0, 1), (1, 0), (1, 1))])
    pts = sorted(set(map(tuple, corners.tolist())))

    def cross(o, a, b) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(seq):
        chain: list = []
        for p in seq:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.array(half(pts) + half(pts[::-1]), dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def classify_shape(piece: np.ndarray, background: np.ndarray) -> str | None:
    """One of SHAPES for a boolean region [H, W]; None when it is too small to tell (under 12 pixels)."""
    ys, xs = np.nonzero(piece)
    if len(ys) < 12:
        return None
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    inner = piece[top:bottom, left:right]
    # a ring: background pixels inside the box that the piece closes off from the box's border
    outside = largest_piece_touching_border(~inner)
    hole = (~inner) & ~outside & background[top:bottom, left:right]
    if hole.sum() >= max(2, 0.03 * inner.size):
        return "ring"
    area = float(len(ys))
    if area / _hull_area(np.stack([ys, xs], 1)) < 0.8:
        return "star"
    extent = area / inner.size
    if extent > 0.88:
        return "square"
    if extent > 0.66:
        return "circle"
    widths = inner.sum(1)
    widest = float(np.flatnonzero(widths >= widths.max() - 1).mean() + 0.5) / inner.shape[0]
    return "triangle" if widest > 0.68 else "diamond"


def largest_piece_touching_border(mask: np.ndarray) -> np.ndarray:
    """Every pixel of `mask` connected to the border of the array (the outside of a shape's box)."""
    padded = np.pad(mask, 1, constant_values=True)
    return largest_piece(padded)[1:-1, 1:-1]


def nearest_place(centre: tuple[float, float]) -> str:
    """The data set's place word whose centre is nearest (x, y in fractions of the picture)."""
    return min(PLACES, key=lambda k: (PLACES[k][0] - centre[0]) ** 2 + (PLACES[k][1] - centre[1]) ** 2)




def region_share(picture: Image.Image | np.ndarray, colour: str, region: np.ndarray) -> float:
    """Fraction of the pixels inside boolean `region` [H, W] that are named `colour`."""
    names = name_pixels(picture)
    return float((names[region] == NAMES.index(colour)).mean())
