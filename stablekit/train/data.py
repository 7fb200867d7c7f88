"""Training data: folders of pictures with same-name .txt captions, encoded once per picture."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..images import fit_picture, load_picture, to_tensor
from ..models.vae import AutoencoderKL

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def captioned_pictures(folder: Path) -> list[tuple[Path, str]]:
    """(picture, caption) pairs: every picture with a same-name .txt beside it; clear errors otherwise."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    pairs = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in PICTURE_SUFFIXES:
            text = path.with_suffix(".txt")
            if not text.is_file():
                raise ValueError(f"{path.name} has no caption file {text.name}")
            pairs.append((path, text.read_text(encoding="utf-8").strip()))
    if not pairs:
        raise ValueError(f"{folder}: no pictures ({', '.join(PICTURE_SUFFIXES)}) with .txt captions")
    return pairs


def pictures_in(folder: Path) -> list[Path]:
    """The pictures of a folder (captions not needed); a clear error when there are none."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    found = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in PICTURE_SUFFIXES]
    if not found:
        raise ValueError(f"{folder}: no pictures ({', '.join(PICTURE_SUFFIXES)})")
    return found


def bucket_sizes(size: int) -> list[tuple[int, int]]:
    """Aspect-ratio buckets of about size x size pixels: widths from size/2 to 2*size in steps of
    size/8 (64 at 512), each with the largest height in the same steps that keeps the area."""
    step = max(8, size // 8)
    out = []
    for w in range(size // 2 // step * step, 2 * size + 1, step):
        h = size * size // w // step * step
        if size // 2 <= h <= 2 * size:
            out.append((w, h))
    return out


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(width / height)))


def captioned_batches(pairs: list[tuple[Path, str]], vae: AutoencoderKL, size: int, batch_size: int, seed: int,
                      device: torch.device, flip: bool = False, buckets: bool = False,
                      ) -> Callable[[int], tuple[torch.Tensor, list[str]]]:
    """step -> (scaled latents [B, 4, h/8, w/8], captions): pictures drawn by a step-seeded RNG (a
    resumed run draws the same ones), each fitted (crop-and-resize) and encoded once. The fit is a
    size x size square, or with `buckets` the aspect-ratio bucket nearest the picture's (kohya's
    bucketing: a step's batch comes from one bucket, buckets drawn by how many pictures they hold).
    With `flip`, each draw is mirrored left-right with probability 1/2 (the mirror encoded once too)."""
    if size % 8:
        raise ValueError(f"--size must be a multiple of 8, got {size}")
    sizes = bucket_sizes(size) if buckets else [(size, size)]
    by_bucket: dict[tuple[int, int], list[tuple[Path, str]]] = {}
    for path, caption in pairs:
        with Image.open(path) as picture:
            fit = nearest_bucket(*picture.size, sizes) if buckets else (size, size)
        by_bucket.setdefault(fit, []).append((path, caption))
    order = sorted(by_bucket)
    latents: dict[tuple[Path, bool], torch.Tensor] = {}

    @torch.no_grad()
    def latent_of(path: Path, mirrored: bool, fit: tuple[int, int]) -> torch.Tensor:
        if (path, mirrored) not in latents:
            picture = to_tensor(fit_picture(load_picture(path), *fit, "crop-and-resize")).to(device)
            if mirrored:
                picture = picture.flip(-1)
            latents[path, mirrored] = vae.encode(picture * 2 - 1)[0] * vae.cfg.scale_factor  # [1, 4, h/8, w/8]
        return latents[path, mirrored]

    def batches(step: int) -> tuple[torch.Tensor, list[str]]:
        rng = random.Random(seed * 1_000_003 + step)
        fit = order[0] if len(order) == 1 else rng.choices(order, weights=[len(by_bucket[b]) for b in order])[0]
        chosen = [(rng.choice(by_bucket[fit]), flip and rng.random() < 0.5) for _ in range(batch_size)]
        return torch.cat([latent_of(p, m, fit) for (p, _), m in chosen]), [c for (_, c), _ in chosen]

    return batches
