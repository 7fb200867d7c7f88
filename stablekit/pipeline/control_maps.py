"""ControlNet preprocessors ("modules"): a picture -> the control map a ControlNet reads, written here.

Names, defaults and formulas are the web UI ControlNet extension's (`model_free_preprocessors.py`,
the legacy `processor.py`): each takes an 8-bit RGB picture [H, W, 3], a processor resolution and up
to two slider values, and returns an 8-bit RGB map. `depth_midas` runs the project's DPT-Hybrid depth
estimator (pipeline.control.midas_map); the others need no model. `fit_control_map` fits a map to the
working size as the extension's `detectmap_proc` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .control_ops import canny, gaussian_blur, otsu_threshold, resize, resize_with_pad

__all__ = ["PREPROCESSORS", "Preprocessor", "Slider", "find_preprocessor", "fit_control_map", "from_pil",
           "resize_with_pad", "to_hint"]


@dataclass(frozen=True)
class Slider:
    label: str
    minimum: float
    maximum: float
    default: float
    step: float = 1


MapFn = Callable[[np.ndarray, int, float, float], np.ndarray]  # (picture, resolution, a, b) -> map


@dataclass(frozen=True)
class Preprocessor:
    name: str
    label: str
    function: MapFn
    resolution: int | None = 512  # the processor resolution's default; None: the module ignores it
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None

    def slider_value(self, slider: Slider | None, given: float, what: str) -> float | None:
        """A slider's value: -1 (the API's "unset") is its default; outside its range a clear error."""
        if slider is None:
            return None
        if given == -1:
            return slider.default
        if not slider.minimum <= given <= slider.maximum:
            raise ValueError(f"{self.name}: {what} ({slider.label}) must be in {slider.minimum:g}..{slider.maximum:g}, "
                             f"got {given:g}")
        return given


def from_pil(image: Image.Image) -> np.ndarray:
    """A picture as [H, W, 3] uint8, as the extension's HWC3 makes it (RGBA over white by its alpha)."""
    if image.mode in ("RGBA", "LA", "P"):
        x = np.asarray(image.convert("RGBA")).astype(np.float32)
        alpha = x[:, :, 3:4] / 255.0
        return (x[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"))


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2) if grey.ndim == 2 else grey


def _none(picture: np.ndarray, resolution: int, a: float, b: float) -> np.ndarray:
    return picture


def _canny(picture: np.ndarray, resolution: int, a: float, b: float) -> np.ndarray:
    padded, remove_pad = resize_with_pad(picture, resolution)
    return remove_pad(_rgb(canny(padded, int(a), int(b))))


def _invert(picture: np.ndarray, resolution: int, a: float, b: float) -> np.ndarray:
    return 255 - picture


def _lineart_standard(picture: np.ndarray, resolution: int, a: float, b: float) -> np.ndarray:
    """Dark lines on a light picture -> bright lines on black: how far each pixel is below its blur."""
    padded, remove_pad = resize_with_pad(picture, resolution)
    x = padded.astype(np.float32)
    intensity = np.min(gaussian_blur(x, 6.0) - x, axis=2).clip(0, 255)
    lines = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(lines))) if lines.size else 16.0
    intensity *= 127
    return remove_pad(_rgb(intensity.clip(0, 255).astype(np.uint8)))


def _scribble_xdog(picture: np.ndarray, resolution: int, a: float, b: float) -> np.ndarray:
    """XDoG scribble: a difference of Gaussians (0.5 and 5), thresholded."""
    padded, remove_pad = resize_with_pad(picture, resolution)
    x = padded.astype(np.float32)
    dog = (255 - np.min(gaussian_blur(x, 5.0) - gaussian_blur(x, 0.5), axis=2)).clip(0, 255).astype(np.uint8)
    # 2 * (255 - dog) in 8 bits, wrapping as the extension's uint8 arithmetic does
    strength = (2 * (255 - dog.astype(np.int64))) % 256
    out = np.zeros_like(padded)
    out[strength > a] = 255
    return remove_pad(out)


def _blur_gaussian(picture: np.ndarray, resolution: int, a: float, b: float) -> np.ndarray:
    padded, remove_pad = resize_with_pad(picture, resolution)
    return gaussian_blur(remove_pad(padded), float(a), eight_bit=True)


def _needs_estimator(picture: np.ndarray, resolution: int, a: float, b: float) -> np.ndarray:
    raise ValueError("depth_midas runs the depth estimator: use it through a ControlNet unit or stablekit preprocess")


PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in (
    Preprocessor("none", "none", _none, resolution=None),
    Preprocessor("canny", "canny", _canny, threshold_a=Slider("Low Threshold", 1, 255, 100),
                 threshold_b=Slider("High Threshold", 1, 255, 200)),
    Preprocessor("depth_midas", "depth_midas", _needs_estimator),
    Preprocessor("lineart_standard", "lineart_standard (from white bg & black line)", _lineart_standard),
    Preprocessor("invert", "invert (from white bg & black line)", _invert, resolution=None),
    Preprocessor("scribble_xdog", "scribble_xdog", _scribble_xdog, threshold_a=Slider("XDoG Threshold", 1, 64, 32)),
    Preprocessor("blur_gaussian", "blur_gaussian", _blur_gaussian,
                 threshold_a=Slider("Sigma", 0.01, 64.0, 9.0, 0.01)),
)}
ALIASES = {"depth": "depth_midas"}  # the extension's older name ("lineart" is its model-based lineart_realistic)


def find_preprocessor(name: str) -> Preprocessor:
    """By name, label or alias (any case)."""
    key = ALIASES.get(name.lower(), name.lower())
    for pre in PREPROCESSORS.values():
        if key in (pre.name, pre.label.lower()):
            return pre
    raise ValueError(f"unknown preprocessor '{name}'; choose from {', '.join(PREPROCESSORS)}")


# --- fitting a map to the working size -------------------------------------------------------------


def _high_quality_resize(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """The extension's interpolation choice: nearest for maps of 3..199 colours (segmentation), box when
    shrinking, bicubic when enlarging; a black-and-white map is thresholded again (Otsu) afterwards.
    (The extension also thins one-pixel edges after enlarging them; that step is left out.)"""
    if x.shape[:2] == (height, width):
        return x
    colours = len(np.unique(x.reshape(-1, x.shape[2]), axis=0))
    binary = colours == 2 and x.min() < 16 and x.max() > 240
    if 2 < colours < 200:
        method = "nearest"
    elif width * height < x.shape[0] * x.shape[1]:
        method = "area"
    else:
        method = "cubic"
    y = resize(x, width, height, method)
    if binary:
        grey = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
        y = _rgb(otsu_threshold(grey)[1])
    return y


def fit_control_map(detected: np.ndarray, width: int, height: int, mode: str) -> np.ndarray:
    """A map [h, w, 3] -> [height, width, 3]: "just-resize" stretches; "crop" covers and crops the middle;
    "fill" fits inside, centred on the median colour of the map's border."""
    if mode not in ("just-resize", "crop", "fill"):
        raise ValueError(f"unknown control resize mode '{mode}'; choose just-resize, crop or fill")
    if mode == "just-resize":
        return _high_quality_resize(detected, width, height)
    h, w = detected.shape[:2]
    k = (min if mode == "fill" else max)(height / h, width / w)
    resized = _high_quality_resize(detected, int(np.round(w * k)), int(np.round(h * k)))
    nh, nw = resized.shape[:2]
    if mode == "fill":
        border = np.concatenate([detected[0], detected[-1], detected[:, 0], detected[:, -1]], axis=0)
        out = np.tile(np.median(border, axis=0).astype(detected.dtype)[None, None], (height, width, 1))
        top, left = max(0, (height - nh) // 2), max(0, (width - nw) // 2)
        out[top:top + nh, left:left + nw] = resized
        return out
    top, left = max(0, (nh - height) // 2), max(0, (nw - width) // 2)
    return np.ascontiguousarray(resized[top:top + height, left:left + width])


def to_hint(detected: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [1, 3, H, W] float32 in [0, 1], the ControlNet's input."""
    return torch.from_numpy(np.array(detected, copy=True)).float().permute(2, 0, 1)[None] / 255.0
