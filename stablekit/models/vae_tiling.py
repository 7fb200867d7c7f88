"""Tiled VAE decoding and encoding: big pictures in bounded memory.

The latent (or picture) is cut into overlapping tiles, each is decoded (encoded) on its own,
and the overlaps are cross-faded with linear ramps, so no seam shows. Memory then depends on
the tile size, not the picture size. A latent that fits in one tile is decoded exactly as
without tiling. Why it is not the default: each tile normalises (GroupNorm) with its own
statistics, so a tiled result differs slightly from the untiled one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Tiling:
    """Tile and overlap sizes in latent pixels (x8 in picture pixels)."""

    tile: int = 64  # 512 picture pixels: what SD 1.x was trained on
    overlap: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < self.tile // 2 or self.tile < 8:
            raise ValueError(f"VAE tiling needs tile >= 8 and 0 <= overlap < tile / 2, got tile {self.tile}, "
                             f"overlap {self.overlap}")


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering [0, size): stride tile - overlap, the last flush with the end."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, fade_before: int, fade_after: int) -> torch.Tensor:
    """Weights along one axis of a tile: rising over `fade_before`, falling over `fade_after`, 1 between."""
    pos = torch.arange(length, dtype=torch.float32) + 0.5
    w = torch.ones(length)
    if fade_before:
        w = torch.minimum(w, pos / fade_before)
    if fade_after:
        w = torch.minimum(w, (length - pos) / fade_after)
    return w


def _axis_weights(size: int, tile: int, overlap: int, scale: float) -> list[tuple[int, int, torch.Tensor]]:
    """(input offset, output offset, weights along this axis) of each tile: ramps over the overlaps with its
    neighbours, measured in output pixels; none at the picture's border."""
    starts = tile_starts(size, tile, overlap)
    length = round(min(tile, size) * scale)
    axis = []
    for k, start in enumerate(starts):
        before = starts[k - 1] + tile - start if k > 0 else 0
        after = start + tile - starts[k + 1] if k + 1 < len(starts) else 0
        axis.append((start, round(start * scale), _ramp(length, round(before * scale), round(after * scale))))
    return axis


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """Apply `fn` (which scales height and width by `scale`) tile by tile to x [B, C, H, W] and blend.

    Where two tiles overlap, each one's weight falls linearly across the overlap (measured in
    the output), so the result moves smoothly from one tile to the next.
    """
    h, w = x.shape[-2:]
    rows, cols = _axis_weights(h, tile, overlap, scale), _axis_weights(w, tile, overlap, scale)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)
    out: torch.Tensor | None = None
    weight = torch.zeros(round(h * scale), round(w * scale), device=x.device)
    for y0, oy, wy in rows:
        for x0, ox, wx in cols:
            part = fn(x[..., y0:y0 + tile, x0:x0 + tile]).float()
            if out is None:  # the output's channels are known once fn has run
                out = torch.zeros(*part.shape[:2], *weight.shape, device=x.device)
            th, tw = part.shape[-2:]
            wt = (wy[:, None] * wx[None, :]).to(x.device)
            out[..., oy:oy + th, ox:ox + tw] += part * wt
            weight[oy:oy + th, ox:ox + tw] += wt
    assert out is not None
    return (out / weight).to(x.dtype)
