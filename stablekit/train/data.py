"""Training data: folders of pictures with same-name .txt captions, encoded once per picture."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import torch

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


def captioned_batches(pairs: list[tuple[Path, str]], vae: AutoencoderKL, size: int, batch_size: int, seed: int,
                      device: torch.device, flip: bool = False) -> Callable[[int], tuple[torch.Tensor, list[str]]]:
    """step -> (scaled latents [B, 4, size/8, size/8], captions): pictures drawn by a step-seeded RNG
    (a resumed run draws the same ones), each fitted to a square (crop-and-resize) and encoded once;
    with `flip`, each draw is mirrored left-right with probability 1/2 (the mirror encoded once too)."""
    if size % 8:
        raise ValueError(f"--size must be a multiple of 8, got {size}")
    latents: dict[tuple[Path, bool], torch.Tensor] = {}

    @torch.no_grad()
    def latent_of(path: Path, mirrored: bool) -> torch.Tensor:
        if (path, mirrored) not in latents:
            picture = to_tensor(fit_picture(load_picture(path), size, size, "crop-and-resize")).to(device)
            if mirrored:
                picture = picture.flip(-1)
            latents[path, mirrored] = vae.encode(picture * 2 - 1)[0] * vae.cfg.scale_factor  # [1, 4, size/8, size/8]
        return latents[path, mirrored]

    def batches(step: int) -> tuple[torch.Tensor, list[str]]:
        rng = random.Random(seed * 1_000_003 + step)
        chosen = [(rng.choice(pairs), flip and rng.random() < 0.5) for _ in range(batch_size)]
        return torch.cat([latent_of(p, m) for (p, _), m in chosen]), [c for (_, c), _ in chosen]

    return batches
