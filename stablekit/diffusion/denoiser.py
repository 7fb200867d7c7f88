"""Denoisers D(x, sigma) -> x0 in sigma space, and the wrappers composed around them.

| name     | symbol (Karras et al. 2022, table 1, sigma_data = 1) |
|----------|------------------------------------------------------|
| c_in     | 1 / sqrt(sigma^2 + 1)   (network input scaling)      |
| c_skip   | 1 / (sigma^2 + 1)       (v-prediction only)          |
| c_out    | -sigma (eps), -sigma / sqrt(sigma^2 + 1) (v)         |

Latents stay float32 in the sampler; only the network runs in the model dtype.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from .cond import Cond, CondSchedule
from .schedule import ModelSchedule

UNetFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]  # (x, t [B], cond) -> out; a ControlNet wraps one


class Denoise(Protocol):
    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor: ...


class ModelDenoiser:
    """Wraps a discrete-time eps- or v-prediction UNet as D(x, sigma, cond)."""

    def __init__(
        self,
        unet: UNetFn,
        schedule: ModelSchedule,
        prediction: str,
        dtype: torch.dtype,
        quantize: bool = False,
    ):
        if prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction type '{prediction}'; choose eps or v")
        self.unet, self.schedule, self.prediction = unet, schedule, prediction
        self.dtype = dtype
        self.quantize = quantize  # round t to a trained timestep (diffusers' Karras/DPM schedulers do)

    def __call__(self, x: torch.Tensor, sigma: float, cond: Cond) -> torch.Tensor:
        """x [B,4,h,w] float32 -> x0 estimate [B,4,h,w] float32."""
        c_in = (sigma**2 + 1) ** -0.5
        t = torch.full((x.shape[0],), self.schedule.sigma_to_t(sigma, self.quantize), device=x.device)
        out = self.unet((x * c_in).to(self.dtype), t, cond.to(self.dtype)).float()
        return self.x0_from_output(x, sigma, out)

    def _skip_out(self, sigma: float) -> tuple[float, float]:
        """(c_skip, c_out): x0 = c_skip * x + c_out * network output."""
        if self.prediction == "eps":
            return 1.0, -sigma
        c_in = (sigma**2 + 1) ** -0.5
        return c_in**2, -sigma * c_in

    def x0_from_output(self, x: torch.Tensor, sigma: float, out: torch.Tensor) -> torch.Tensor:
        c_skip, c_out = self._skip_out(sigma)
        return x * c_skip + out * c_out

    def output_from_x0(self, x: torch.Tensor, sigma: float, x0: torch.Tensor) -> torch.Tensor:
        """The network output (eps or v) that gives `x0`: what diffusers' guidance rescale works on."""
        c_skip, c_out = self._skip_out(sigma)
        return (x0 - x * c_skip) / c_out


class MaskedDenoiser:
    """Blended-latent inpainting: outside the mask the x0 estimate is the original latent.

    Every sampler then keeps the unmasked region on the original's noise trajectory; for the
    deterministic samplers this equals replacing it with the original noised to each step
    (diffusers' 4-channel inpainting), and it is the web UI's own formulation.
    """

    def __init__(self, inner: Denoise, original: torch.Tensor, mask: torch.Tensor):
        self.inner, self.original, self.mask = inner, original, mask  # mask [B|1, 1, h, w], 1 = repaint

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return self.original * (1 - self.mask) + self.inner(x, sigma) * self.mask


class SoftMaskedDenoiser:
    """Soft inpainting: the mask is a per-pixel denoising strength in [0, 1].

    A latent pixel of strength m follows the original (as in MaskedDenoiser) until the part of the
    schedule still to run drops to m, then joins the generation; strength 1 takes part from the
    start, strength 0 never. The schedule position of a sigma is read off the full schedule.
    """

    def __init__(self, inner: Denoise, original: torch.Tensor, strength: torch.Tensor, schedule: torch.Tensor):
        self.inner, self.original, self.strength = inner, original, strength  # strength [B|1, 1, h, w]
        self.schedule = schedule.tolist()  # the full schedule, descending, for `steps` steps

    def remaining(self, sigma: float) -> float:
        """Fraction of the full schedule still to run at `sigma` (1 at the start, 0 at the end)."""
        steps = len(self.schedule) - 1
        passed = sum(1 for s in self.schedule[1:] if s >= sigma)  # schedule entries at or above sigma
        return (steps - passed) / steps

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        active = (self.strength >= self.remaining(sigma)).float()
        return self.original * (1 - active) + self.inner(x, sigma) * active


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale * (cond - uncond).

    Cond and uncond go through the network as one batch when their shapes allow, otherwise as two
    calls (a prompt and a negative prompt of different lengths; the web UI's default); with scale 1
    the uncond half is skipped. Either may be a CondSchedule (prompt editing): the conditioning of
    each call is looked up by the number of calls so far. `rescale` (phi of Lin et al. 2023,
    diffusers' guidance_rescale) pulls the guided output's standard deviation back towards the
    conditional one's, against over-exposure.
    """

    def __init__(
        self,
        model: ModelDenoiser,
        cond: Cond | CondSchedule,
        uncond: Cond | CondSchedule,
        scale: float,
        rescale: float = 0.0,
    ):
        self.model, self.scale, self.rescale = model, scale, rescale
        self.cond = cond if isinstance(cond, CondSchedule) else CondSchedule.constant(cond)
        self.uncond = uncond if isinstance(uncond, CondSchedule) else CondSchedule.constant(uncond)
        self.calls = 0
        self._batched: dict[tuple[int, int], Cond | None] = {}  # (id cond, id uncond) -> both as one batch

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        cond, uncond = self.cond.at(self.calls), self.uncond.at(self.calls)
        self.calls += 1
        if self.scale == 1.0:
            return self.model(x, sigma, cond)
        key = (id(cond), id(uncond))
        if key not in self._batched:  # made once per pair, not per step
            self._batched[key] = Cond.cat([cond, uncond]) if cond.batchable_with(uncond) else None
        batched = self._batched[key]
        if batched is not None:
            out_cond, out_uncond = self.model(torch.cat([x, x]), sigma, batched).chunk(2)
        else:
            out_cond, out_uncond = self.model(x, sigma, cond), self.model(x, sigma, uncond)
        guided = out_uncond + (out_cond - out_uncond) * self.scale
        if self.rescale > 0:
            guided = self._rescaled(x, sigma, out_cond, guided)
        return guided

    def _rescaled(self, x: torch.Tensor, sigma: float, cond: torch.Tensor, guided: torch.Tensor) -> torch.Tensor:
        """Lin et al. 2023, eq. 15-16, on the network output as diffusers does (x0 is affine in it)."""
        out_cond = self.model.output_from_x0(x, sigma, cond)
        out = self.model.output_from_x0(x, sigma, guided)
        dims = list(range(1, out.ndim))
        matched = out * (out_cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
        return self.model.x0_from_output(x, sigma, self.rescale * matched + (1 - self.rescale) * out)
