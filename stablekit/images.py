"""Pictures: tensor <-> PIL, the A1111 infotext, and saving PNGs without overwriting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] float in [0, 1] -> RGB pictures (rounded to 8 bits)."""
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def _quote(value: object) -> str:
    """A1111 quotes values that would break the `key: value, ...` line."""
    text = str(value)
    if any(c in text for c in ",:\n"):
        return json.dumps(text, ensure_ascii=False)
    return text


def _fmt(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def infotext(prompt: str, negative_prompt: str, fields: dict[str, object]) -> str:
    """The `parameters` text: prompt, optional `Negative prompt:` line, then `Key: value, ...`.

    Keys whose value is None are left out, as the web UI does.
    """
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(_fmt(v))}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, out_dir: Path, seed: int) -> Path:
    """Write `NNNNN-SEED.png` with the next free number; an existing file is never replaced."""
    out_dir.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name[:5]) for p in out_dir.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    n = max(numbers, default=-1) + 1
    meta = PngInfo()
    if "parameters" in image.info:
        meta.add_text("parameters", image.info["parameters"])
    while True:
        path = out_dir / f"{n:05d}-{seed}.png"
        try:
            with open(path, "xb") as f:  # exclusive create: never overwrite, even with a concurrent writer
                image.save(f, format="PNG", pnginfo=meta)
            return path
        except FileExistsError:
            n += 1
