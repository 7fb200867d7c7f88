"""Picture operations the control-map preprocessors are made of, as OpenCV computes them (numpy only).

canny and otsu_threshold are OpenCV's exactly (checked bit for bit against cv2 in the tests);
gaussian_blur is cv2.GaussianBlur's kernel and border on float pictures; resize is cv2.resize's
nearest and area exactly and its cubic within one level.
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
    p = np.pad(x, pad, mode="reflect")  # reflect-101 (numpy repeats the reflection for short sides, as OpenCV)
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
    """cv2.resize of [H, W, C] uint8 to (height, width): method nearest, area or cubic; unchanged sizes
    untouched. Nearest and area (both sides shrinking) are OpenCV's exactly; cubic is within 1 level of
    cv2 built with IPP (exact to its own code). Area with one side growing, where OpenCV switches to a
    linear-like path, uses Pillow's box filter."""
    if picture.shape[:2] == (height, width):
        return picture
    if method == "nearest":
        return _cv_nearest(picture, width, height)
    if method == "cubic":
        return _cv_cubic(picture, width, height)
    if width <= picture.shape[1] and height <= picture.shape[0]:
        return _cv_area(picture, width, height)
    channels = [Image.fromarray(np.ascontiguousarray(picture[:, :, c])).resize((width, height), Image.Resampling.BOX)
                for c in range(picture.shape[2])]
    return np.stack([np.asarray(c) for c in channels], axis=2)


# --- OpenCV's resampling, in numpy ---------------------------------------------------------------

def _cv_nearest(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """INTER_NEAREST: source index floor(d * src / dst)."""
    h, w = x.shape[:2]
    sx = np.minimum(np.floor(np.arange(width) * (1.0 / (width / w))).astype(int), w - 1)
    sy = np.minimum(np.floor(np.arange(height) * (1.0 / (height / h))).astype(int), h - 1)
    return x[sy][:, sx]

def _cubic_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output index: 4 clamped source indices and 11-bit fixed-point weights (A = -0.75)."""
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    t = (f - s.astype(np.float32)).astype(np.float32)
    A = np.float32(-0.75)
    one = np.float32(1)
    c0 = ((A * (t + one) - np.float32(5) * A) * (t + one) + np.float32(8) * A) * (t + one) - np.float32(4) * A
    c1 = ((A + np.float32(2)) * t - (A + np.float32(3))) * t * t + one
    u = one - t
    c2 = ((A + np.float32(2)) * u - (A + np.float32(3))) * u * u + one
    c3 = one - c0 - c1 - c2
    coef = np.stack([c0, c1, c2, c3], 1).astype(np.float32)
    icoef = np.rint(coef * np.float32(2048)).astype(np.int64)
    idx = np.clip(s[:, None] + np.arange(-1, 3)[None], 0, src - 1)
    return idx, icoef

def _cv_cubic(x: np.ndarray, width: int, height: int, float_vertical: bool = True) -> np.ndarray:
    """INTER_CUBIC: 11-bit fixed-point horizontal taps, float32 vertical pass (OpenCV's SIMD path)."""
    h, w = x.shape[:2]
    xi, xc = _cubic_taps(w, width)
    yi, yc = _cubic_taps(h, height)
    a = x.astype(np.int64)
    rows = np.einsum("hwkc,wk->hwc", a[:, xi], xc) if a.ndim == 3 else np.einsum("hwk,wk->hw", a[:, xi], xc)
    if float_vertical:  # OpenCV's SIMD vertical pass: float32 multiply-adds, round half even
        b = (yc.astype(np.float32) * np.float32(1.0 / (2048 * 2048))).astype(np.float32)
        r = rows.astype(np.float32)
        acc = r[yi[:, 0]] * b[:, 0, None, None] if a.ndim == 3 else r[yi[:, 0]] * b[:, 0, None]
        for k in range(1, 4):
            bk = b[:, k, None, None] if a.ndim == 3 else b[:, k, None]
            acc = (acc + r[yi[:, k]] * bk).astype(np.float32)
        return np.clip(np.rint(acc), 0, 255).astype(np.uint8)
    out = sum(rows[yi[:, k]] * (yc[:, k, None, None] if a.ndim == 3 else yc[:, k, None]) for k in range(4))
    return np.clip((out + (1 << 21)) >> 22, 0, 255).astype(np.uint8)

def _area_tab(src: int, dst: int) -> list[tuple[int, int, np.float32]]:
    scale = 1.0 / (dst / src)
    tab = []
    for d in range(dst):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, src - f1)
        s1, s2 = math.ceil(f1), math.floor(f2)
        s2 = min(s2, src - 1)
        s1 = min(s1, s2)
        if s1 - f1 > 1e-3:
            tab.append((d, s1 - 1, np.float32((s1 - f1) / cell)))
        for s in range(s1, s2):
            tab.append((d, s, np.float32(1.0 / cell)))
        if f2 - s2 > 1e-3:
            tab.append((d, s2, np.float32(min(min(f2 - s2, 1.0), cell) / cell)))
    return tab

def _cv_area(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """INTER_AREA when both sides shrink: integer factors by block sums, others by OpenCV's area table."""
    h, w = x.shape[:2]
    sx, sy = 1.0 / (width / w), 1.0 / (height / h)
    ix, iy = int(round(sx)), int(round(sy))
    if abs(sx - ix) < 2.2e-16 and abs(sy - iy) < 2.2e-16:  # integer factors: OpenCV's fast path
        a = x[:height * iy, :width * ix].astype(np.int64)
        s = a.reshape(height, iy, width, ix, *a.shape[2:]).sum(axis=(1, 3))
        if ix == 2 and iy == 2:
            return ((s + 2) >> 2).astype(np.uint8)
        return np.clip(np.rint(s.astype(np.float32) * np.float32(1.0 / (ix * iy))), 0, 255).astype(np.uint8)
    f = x.astype(np.float32)
    buf = np.zeros((h, width) + x.shape[2:], np.float32)
    for d, s, alpha in _area_tab(w, width):  # horizontal sums, in OpenCV's order (float32)
        buf[:, d] += f[:, s] * alpha
    out = np.zeros((height, width) + x.shape[2:], np.float32)
    seen = np.zeros(height, bool)
    for d, s, beta in _area_tab(h, height):
        if seen[d]:
            out[d] += beta * buf[s]
        else:
            out[d] = beta * buf[s]
            seen[d] = True
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


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
