"""ControlNet on every task: a unit as the user asks for it, its prepared map, and the UNet wrapper.

A unit's map rides in the Cond (`ControlInput`: network, hint, per-row residual scales, step
window), so CFG batches it with the prompts and every task that builds a guided denoiser gets it;
`ControlledUNet` adds the residuals to the UNet's skips. The formulas are the web UI extension's:

| control mode                  | residual i of n (i = 0 .. n-1, the middle block last) | negative prompt |
|-------------------------------|-------------------------------------------------------|-----------------|
| balanced                      | weight                                                | same            |
| prompt ("My prompt is more    | weight * 0.825 ** (n - 1 - i)                         | same            |
|  important", soft injection)  |                                                       |                 |
| control ("ControlNet is more  | weight * 0.825 ** (n - 1 - i)                         | none (0)        |
|  important", + CFG injection) |                                                       |                 |
| guess mode (diffusers)        | weight * 10 ** (-1 + i / (n - 1))                     | none (0)        |

Step window: the web UI extension acts while start <= s / N <= end, where s is the last step the
sampler has reported done (0 before the first) and N the steps this pass runs; diffusers' rule
(`timing="diffusers"`) drops step i when i / N < start or (i + 1) / N > end. Outside its window a
ControlNet is not run at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..addons.controlnet_files import LoadedControlNet
from ..diffusion.cond import Cond, ControlInput
from .control_maps import find_preprocessor, fit_control_map, from_pil, resize_with_pad, to_hint
from .steps import StepClock

CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                 "control": "ControlNet is more important"}
CONTROL_RESIZE = {"just-resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}
HR_OPTIONS = {"both": "Both", "low": "Low res only", "high": "High res only"}
TIMINGS = ("webui", "diffusers")
MAX_WEIGHT = 2.0  # the extension's weight slider: 0..2
SOFT_IN_HIRES = ("canny", "mlsd")  # the extension softens these maps' residuals in the hires pass


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet as a user asks for it (the extension's ControlNetUnit, in our names)."""

    model: str  # a file or folder, or a name in the ControlNet folder ("name" or "name [hash]")
    image: Image.Image | None = None  # what the preprocessor reads; None: the task's own picture
    weight: float = 1.0
    start: float = 0.0  # fraction of the steps before it starts acting
    end: float = 1.0  # ... and after which it stops
    mode: str = "balanced"
    resize: str = "crop"  # how the map is fitted to the working size
    module: str = "none"  # the preprocessor
    processor_res: int = -1  # -1: the preprocessor's default
    threshold_a: float = -1
    threshold_b: float = -1
    pixel_perfect: bool = False  # the preprocessor resolution from the picture and working sizes
    hr_option: str = "both"  # with hires fix: both passes, the first ("low") or the second ("high")
    guess_mode: bool = False  # diffusers' guess mode (the prompt's half only, log-spaced scales)
    timing: str = "webui"

    def validated(self) -> ControlUnit:
        if not 0 <= self.weight <= MAX_WEIGHT:
            raise ValueError(f"control weight must be in 0..{MAX_WEIGHT:g}, got {self.weight}")
        if not 0 <= self.start <= self.end <= 1:
            raise ValueError(f"control start and end must satisfy 0 <= start <= end <= 1, got {self.start}, {self.end}")
        for name, value, choices in (("mode", self.mode, CONTROL_MODES), ("resize", self.resize, CONTROL_RESIZE),
                                     ("hr option", self.hr_option, HR_OPTIONS), ("timing", self.timing, TIMINGS)):
            if value not in choices:
                raise ValueError(f"unknown control {name} '{value}'; choose from {', '.join(choices)}")
        if self.guess_mode and self.mode != "balanced":
            raise ValueError("guess mode is diffusers' form of the 'control' mode: give one of the two")
        object.__setattr__(self, "module", find_preprocessor(self.module).name)  # aliases to the name
        return self


@dataclass(frozen=True)
class Control:
    """A unit ready to run: its network and its detected map (before fitting to a working size)."""

    unit: ControlUnit
    net: LoadedControlNet
    detected: np.ndarray  # [H, W, 3] uint8
    settings: dict[str, object] = field(default_factory=dict)  # the preprocessor values used (infotext)

    def serves(self, second_pass: bool) -> bool:
        option = self.unit.hr_option
        return option == "both" or option == ("high" if second_pass else "low")

    def infotext(self) -> str:
        """The extension's `ControlNetUnit.serialize`: 'Module: canny, Model: name [hash], Weight: 1.0, ...'."""
        u = self.unit
        values = {"Module": u.module, "Model": self.net.label, "Weight": float(u.weight),
                  "Resize Mode": CONTROL_RESIZE[u.resize], **self.settings, "Guidance Start": float(u.start),
                  "Guidance End": float(u.end), "Pixel Perfect": u.pixel_perfect,
                  "Control Mode": CONTROL_MODES[u.mode]}
        return ", ".join(f"{k}: {v}" for k, v in values.items())


# --- preparing a unit's map ------------------------------------------------------------------------


def pixel_perfect_resolution(picture: np.ndarray, width: int, height: int, resize: str) -> int:
    """The extension's pixel-perfect preprocessor resolution: the picture's short side as it will
    appear at the working size."""
    h, w = picture.shape[:2]
    k = (min if resize == "fill" else max)(height / h, width / w)
    return int(np.round(k * min(h, w)))


def detect_map(unit: ControlUnit, picture: Image.Image, width: int, height: int,
               depth: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[np.ndarray, dict[str, object]]:
    """The unit's preprocessor on `picture` -> (map [H, W, 3] uint8, the resolution/thresholds used).

    `depth`: pictures [1, 3, H, W] in [-1, 1] -> inverse depth [1, 1, H, W] (for depth_midas)."""
    pre = find_preprocessor(unit.module)
    array = from_pil(picture)
    resolution = pre.resolution
    if resolution is not None:
        resolution = pixel_perfect_resolution(array, width, height, unit.resize) if unit.pixel_perfect else \
            (resolution if unit.processor_res == -1 else unit.processor_res)
        if not 64 <= resolution <= 2048:
            raise ValueError(f"processor resolution must be in 64..2048, got {resolution}")
    a = pre.slider_value(pre.threshold_a, unit.threshold_a, "threshold A")
    b = pre.slider_value(pre.threshold_b, unit.threshold_b, "threshold B")
    if pre.name == "depth_midas":
        if depth is None:
            raise ValueError("the depth_midas preprocessor needs a depth estimator (--depth-model, or a depth "
                             "checkpoint's own)")
        detected = midas_map(array, resolution, depth)
    else:
        detected = pre.function(array, resolution, a, b)
    settings = {"Processor Res": resolution if resolution is not None else unit.processor_res,
                "Threshold A": a if a is not None else unit.threshold_a,
                "Threshold B": b if b is not None else unit.threshold_b}
    return detected, settings


@torch.no_grad()
def midas_map(picture: np.ndarray, resolution: int, depth: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """The extension's depth_midas: DPT-Hybrid run on the picture at the processor resolution (padded to
    multiples of 64), inverse depth min-max scaled to 0..255."""
    padded, remove_pad = resize_with_pad(picture, resolution)
    x = torch.from_numpy(padded).float().permute(2, 0, 1)[None] / 127.5 - 1
    d = depth(x)[0, 0].float()
    d = (d - d.min()) / (d.max() - d.min()).clamp_min(1e-12)
    grey = (d * 255).clamp(0, 255).cpu().numpy().astype(np.uint8)
    return remove_pad(np.repeat(grey[:, :, None], 3, axis=2))


def cropped_to(controls: tuple[Control, ...], width: int, height: int, box: tuple[int, int, int, int],
               ) -> tuple[Control, ...]:
    """The maps as they lie under a crop of a width x height picture ("only masked" inpainting, as the
    extension crops its input): fitted to the whole picture, then cut to the box (left, top, right, bottom)."""
    left, top, right, bottom = box
    return tuple(replace(c, detected=fit_control_map(c.detected, width, height, c.unit.resize)[top:bottom, left:right])
                 for c in controls)


# --- in the denoiser -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StepWindow:
    """Whether the clock's current step is in start..end (rules in the module docstring)."""

    start: float
    end: float
    timing: str
    clock: StepClock

    def __call__(self) -> bool:
        n = max(self.clock.total, 1)
        if self.timing == "webui":
            done = self.clock.reported or 0
            return self.start <= done / n <= self.end
        i = 0 if self.clock.reported is None else self.clock.reported + 1
        return not (i / n < self.start or (i + 1) / n > self.end)


def block_scales(unit: ControlUnit, n: int, soft: bool = False) -> torch.Tensor:
    """[n] residual scales for the prompt's half (`soft`: the hires pass's forced soft injection)."""
    if unit.guess_mode:
        return torch.logspace(-1, 0, n) * unit.weight
    if unit.mode in ("prompt", "control") or soft:
        return torch.tensor([unit.weight * 0.825 ** float(n - 1 - i) for i in range(n)])
    return torch.full((n,), float(unit.weight))


def control_inputs(controls: tuple[Control, ...], width: int, height: int, batch: int, clock: StepClock,
                   device: torch.device, second_pass: bool = False,
                   ) -> tuple[tuple[ControlInput, ...], tuple[ControlInput, ...]]:
    """The ControlInputs of the prompt's and the negative prompt's Conds at this working size."""
    cond, uncond = [], []
    for c in controls:
        if not c.serves(second_pass):
            continue
        u = c.unit
        hint = to_hint(fit_control_map(c.detected, width, height, u.resize)).to(device).expand(batch, -1, -1, -1)
        n = len(c.net.net.skip_channels) + 1
        soft = second_pass and any(name in u.module for name in SOFT_IN_HIRES)
        scales = block_scales(u, n, soft).to(device)[None].expand(batch, -1)
        window = StepWindow(u.start, u.end, u.timing, clock)
        cond.append(ControlInput(c.net.net, hint, scales, window))
        negative = torch.zeros_like(scales) if (u.mode == "control" or u.guess_mode) else scales
        uncond.append(ControlInput(c.net.net, hint, negative, window))
    return tuple(cond), tuple(uncond)


def _network_input(net: torch.nn.Module, x: torch.Tensor, cond: Cond) -> torch.Tensor:
    """What a ControlNet reads of the UNet's input: the latent, or with the extra channels where its
    first convolution takes them (a ControlNet copied from an inpainting UNet)."""
    if net.in_channels == x.shape[1]:
        return x
    full = x if cond.concat is None else torch.cat([x, cond.concat.to(x.dtype)], dim=1)
    if net.in_channels != full.shape[1]:
        raise ValueError(f"the ControlNet reads {net.in_channels} input channels; the UNet's input has "
                         f"{x.shape[1]} (latent) or {full.shape[1]} (with its extra channels)")
    return full


def residuals(ci: ControlInput, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> list[torch.Tensor] | None:
    """One ControlNet's scaled residuals for the batch, run only for rows with a non-zero scale."""
    if not ci.active():
        return None
    rows = (ci.scales != 0).any(dim=1)
    if not bool(rows.any()):
        return None
    every = bool(rows.all())
    idx = rows.nonzero().squeeze(1)

    def take(v: torch.Tensor | None) -> torch.Tensor | None:
        return v if v is None or every else v[idx]

    out = ci.net(take(_network_input(ci.net, x, cond)), take(ci.hint), take(t),
                 Cond(take(cond.crossattn), take(cond.vector)))
    scales = take(ci.scales).to(out[0].dtype)
    scaled = [r * scales[:, i, None, None, None] for i, r in enumerate(out)]
    if every:
        return scaled
    full = []
    for r in scaled:
        z = r.new_zeros((x.shape[0], *r.shape[1:]))
        z[idx] = r
        full.append(z)
    return full


class ControlledUNet:
    """A UNetFn: the UNet with the Cond's ControlNets' residuals (summed) added to its skips."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        total: list[torch.Tensor] | None = None
        for ci in cond.control:
            r = residuals(ci, x, t, cond)
            if r is not None:
                total = r if total is None else [a + b for a, b in zip(total, r)]
        return self.unet(x, t, replace(cond, control=()), control=total)
