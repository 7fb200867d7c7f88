"""Picture operations the control-map preprocessors are made of, as OpenCV computes them (numpy only).

canny and otsu_threshold are OpenCV's exactly (checked bit for bit against cv2 in the tests);
gaussian_blur is cv2.GaussianBlur's kernel and border on float pictures. Resizing uses Pillow (bicubic
up, box down) where the extension uses cv2.resize: it differs by a few levels, and is skipped when the
size does not change, the common case of a picture sent at the processor resolution.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image

TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)  # tan(22.5 deg) in OpenCV's 15-bit fixed point


def _sobel(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives (int64) with the border replicated, as cv2.Canny takes them."""
    p = np.pad(grey.astype(np.int64), 1, mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return dx, dy


def canny(picture: np.ndarray, low: float, high: float) -> np.ndarray:
    """cv2.Canny(picture, low, high): aperture 3, L1 gradient; uint8 [H, W] or [H, W, C] -> [H, W] 0/255.

    Several channels: each pixel takes the derivatives of its channel of largest magnitude (the first
    on ties). Non-maximum suppression with OpenCV's integer angle test, then hysteresis: candidates
    (magnitude > low) joined 8-connected to a strong pixel (> high).
    """
    if picture.dtype != np.uint8 or picture.ndim not in (2, 3):
        raise ValueError("canny takes an 8-bit picture [H, W] or [H, W, C]")
    low, high = math.floor(low), math.floor(high)
    if low > high:
        low, high = high, low
    channels = picture[:, :, None] if picture.ndim == 2 else picture
    grads = [_sobel(channels[:, :, c]) for c in range(channels.shape[2])]
    mags = np.stack([np.abs(dx) + np.abs(dy) for dx, dy in grads])
    best = np.argmax(mags, axis=0)  # the first channel of the largest magnitude
    take = lambda a: np.take_along_axis(a, best[None], 0)[0]  # noqa: E731
    mag = take(mags)
    dx, dy = take(np.stack([g[0] for g in grads])), take(np.stack([g[1] for g in grads]))
    h, w = mag.shape
    m = np.pad(mag, 1)  # magnitudes outside the picture are 0

    def at(oy: int, ox: np.ndarray | int) -> np.ndarray:
        if isinstance(ox, np.ndarray):  # a per-pixel column offset (the diagonals)
            rows = np.arange(h)[:, None] + 1 + oy
            cols = np.arange(w)[None, :] + 1 + ox
            return m[rows, cols]
        return m[1 + oy:1 + oy + h, 1 + ox:1 + ox + w]

    ax, ay = np.abs(dx), np.abs(dy) << 15
    tg22x = ax * TG22
    tg67x = tg22x + (ax << 16)
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg67x)
    s = np.where((dx ^ dy) < 0, -1, 1)
    keep = np.where(horizontal, (mag > at(0, -1)) & (mag >= at(0, 1)),
                    np.where(vertical, (mag > at(-1, 0)) & (mag >= at(1, 0)),
                             (mag > at(-1, -s)) & (mag > at(1, s))))
    candidate = keep & (mag > low)
    return _hysteresis(candidate, candidate & (mag > high))


def _hysteresis(candidate: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Candidates 8-connected to a strong pixel, as 255 (a flood fill from the strong ones)."""
    h, w = candidate.shape
    flat = np.pad(candidate, 1).ravel()
    edge = np.zeros_like(flat)
    width = w + 2
    stack = list(np.flatnonzero(np.pad(strong, 1).ravel()))
    edge[stack] = True
    neighbours = [-width - 1, -width, -width + 1, -1, 1, width - 1, width, width + 1]
    while stack:
        i = stack.pop()
        for d in neighbours:
            j = i + d
            if flat[j] and not edge[j]:
                edge[j] = True
                stack.append(j)
    return edge.reshape(h + 2, w + 2)[1:-1, 1:-1].astype(np.uint8) * 255


def gaussian_kernel(sigma: float, ksize: int) -> np.ndarray:
    x = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    k = np.exp(-x * x / (2 * sigma * sigma))
    return k / k.sum()


def gaussian_blur(picture: np.ndarray, sigma: float, eight_bit: bool = False) -> np.ndarray:
    """cv2.GaussianBlur(picture, (0, 0), sigma) on [H, W, C] (or [H, W]): OpenCV's kernel size for the
    depth (round(sigma * 4 * 2 + 1) | 1 for float pictures, * 3 for 8-bit ones), border reflect-101."""
    ksize = int(round(sigma * (3 if eight_bit else 4) * 2 + 1)) | 1
    k = gaussian_kernel(sigma, ksize)
    r = ksize // 2
    x = picture.astype(np.float64)
    pad = [(r, r), (r, r)] + [(0, 0)] * (x.ndim - 2)
    if min(x.shape[:2]) <= r:  # reflect-101 needs a side longer than the radius; repeat it as OpenCV does
        p = np.pad(x, pad, mode="symmetric")
    else:
        p = np.pad(x, pad, mode="reflect")
    rows = sum(k[i] * p[i:i + x.shape[0]] for i in range(ksize))
    out = sum(k[i] * rows[:, i:i + x.shape[1]] for i in range(ksize))
    return np.clip(np.round(out), 0, 255).astype(np.uint8) if eight_bit else out.astype(np.float32)


def otsu_threshold(grey: np.ndarray) -> tuple[int, np.ndarray]:
    """cv2.threshold(grey, 0, 255, THRESH_BINARY + THRESH_OTSU): (threshold, 0/255 picture)."""
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64) / grey.size
    mu = float(np.dot(np.arange(256), hist))
    best, best_sigma, q1, mu1 = 0, 0.0, 0.0, 0.0
    eps = float(np.finfo(np.float32).eps)
    for i in range(256):  # OpenCV's loop, including its running mean left scaled after a skipped level
        p_i = float(hist[i])
        mu1 *= q1
        q1 += p_i
        q2 = 1.0 - q1
        if min(q1, q2) < eps or max(q1, q2) > 1.0 - eps:
            continue
        mu1 = (mu1 + i * p_i) / q1
        mu2 = (mu - q1 * mu1) / q2
        sigma = q1 * q2 * (mu1 - mu2) ** 2
        if sigma > best_sigma:
            best, best_sigma = i, sigma
    return best, np.where(grey > best, 255, 0).astype(np.uint8)


def resize(picture: np.ndarray, width: int, height: int, method: str) -> np.ndarray:
    """[H, W, C] uint8 to (height, width): method nearest, area (box) or cubic; unchanged sizes untouched."""
    if picture.shape[:2] == (height, width):
        return picture
    filters = {"nearest": Image.Resampling.NEAREST, "area": Image.Resampling.BOX, "cubic": Image.Resampling.BICUBIC}
    channels = [Image.fromarray(picture[:, :, c]).resize((width, height), filters[method])
                for c in range(picture.shape[2])]
    return np.stack([np.asarray(c) for c in channels], axis=2)


def pad64(x: int) -> int:
    return int(np.ceil(x / 64.0) * 64 - x)


def resize_with_pad(picture: np.ndarray, resolution: int) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """The extension's resize_image_with_pad: the short side to `resolution`, then the right and bottom
    edges repeated up to multiples of 64; the function crops a result back."""
    h, w = picture.shape[:2]
    k = resolution / min(h, w)
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    img = resize(picture, tw, th, "cubic" if k > 1 else "area")
    padded = np.pad(img, [[0, pad64(th)], [0, pad64(tw)], [0, 0]], mode="edge")
    return padded, lambda x: np.ascontiguousarray(x[:th, :tw])
