"""Pictures: tensor <-> PIL, the A1111 infotext, and saving PNGs without overwriting."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .params import RESIZE_MODES


def load_picture(path: Path) -> Image.Image:
    """Open a picture file as RGB, with a clear error for anything that is not one."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable picture ({e})") from None


def read_mask(path: Path) -> Image.Image:
    """Open a mask file as it is (an RGBA mask's alpha counts), with a clear error for anything else."""
    try:
        with Image.open(path) as m:
            return m.copy()
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable picture ({e})") from None


def fit_picture(image: Image.Image, width: int, height: int, mode: str = "just-resize") -> Image.Image:
    """Bring a picture to width x height as the web UI's resize modes do.

    just-resize stretches; crop-and-resize scales to cover and crops the centre; resize-and-fill
    scales to fit and fills the bands by stretching the picture's edge rows or columns.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode '{mode}'; choose from {', '.join(RESIZE_MODES)}")
    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    if mode == "just-resize":
        return image.resize((width, height), Image.LANCZOS)
    ratio, src = width / height, image.width / image.height
    if mode == "crop-and-resize":
        w, h = (width, round(width / src)) if ratio > src else (round(height * src), height)
        resized = image.resize((w, h), Image.LANCZOS)
        left, top = (w - width) // 2, (h - height) // 2
        return resized.crop((left, top, left + width, top + height))
    w, h = (round(height * src), height) if ratio > src else (width, round(width / src))
    resized = image.resize((w, h), Image.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    left, top = (width - w) // 2, (height - h) // 2
    canvas.paste(resized, (left, top))
    if left > 0:  # stretch the outermost columns into the side bands
        canvas.paste(resized.crop((0, 0, 1, h)).resize((left, h)), (0, top))
        canvas.paste(resized.crop((w - 1, 0, w, h)).resize((width - left - w, h)), (left + w, top))
    if top > 0:
        canvas.paste(resized.crop((0, 0, w, 1)).resize((w, top)), (left, 0))
        canvas.paste(resized.crop((0, h - 1, w, h)).resize((w, height - top - h)), (left, top + h))
    return canvas


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB picture -> [1, 3, H, W] float32 in [0, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


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


# Reading infotext back (the web UI's png-info): the inverse of `infotext` above.
# `Key: value` pairs of the last line; a value is JSON-quoted when it holds , : or a newline.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def parse_infotext(text: str) -> dict[str, str]:
    """`prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: Euler, Size: 512x512, ...` ->
    {"Prompt", "Negative prompt", "Steps", "Sampler", "Size-1", "Size-2", ...} (values as text)."""
    lines = text.strip().split("\n")
    params_line = ""
    if lines and len(_PARAM.findall(lines[-1])) >= 3:
        params_line = lines.pop()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, str] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(params_line):
        value = _unquote(value.strip())
        size = _SIZE.match(value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        else:
            out[key] = value
    return out
