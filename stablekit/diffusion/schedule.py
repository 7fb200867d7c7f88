"""Noise levels: the model's discrete schedule, and the step schedules samplers walk.

Sigma space (Karras et al. 2022): x = x0 + sigma * noise. A discrete DDPM timestep t with
cumulative alpha a_t has sigma_t = sqrt((1 - a_t) / a_t); the variance-preserving latent is
x_vp = x / sqrt(1 + sigma^2). All schedules are float64 on the CPU, descending.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..config import ScheduleConfig


class ModelSchedule:
    """The training schedule of a discrete-time model: sigma <-> t conversions."""

    def __init__(self, cfg: ScheduleConfig = ScheduleConfig()):
        betas = torch.linspace(cfg.linear_start**0.5, cfg.linear_end**0.5, cfg.timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # [T]
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # [T], ascending in t
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Fractional timesteps -> sigmas, interpolating log sigma linearly (as k-diffusion does)."""
        t = t.to(torch.float64).clamp(0, len(self.sigmas) - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def sigma_to_t(self, sigma: float, quantize: bool = False) -> float:
        """Inverse of t_to_sigma; `quantize` rounds to the nearest trained timestep."""
        log_sigma = math.log(max(sigma, 1e-10))
        if quantize:
            return float((self.log_sigmas - log_sigma).abs().argmin())
        idx = int(torch.searchsorted(self.log_sigmas, torch.tensor(log_sigma, dtype=torch.float64), right=True))
        low = min(max(idx - 1, 0), len(self.sigmas) - 2)
        lo, hi = float(self.log_sigmas[low]), float(self.log_sigmas[low + 1])
        w = min(max((lo - log_sigma) / (lo - hi), 0.0), 1.0)
        return low + w


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def uniform(ms: ModelSchedule, steps: int) -> torch.Tensor:
    """Evenly spaced in t from T-1 to 0, then 0 (k-diffusion `get_sigmas`; A1111 "Uniform")."""
    t = torch.linspace(len(ms.sigmas) - 1, 0, steps, dtype=torch.float64)
    return _append_zero(ms.t_to_sigma(t))


def karras(ms: ModelSchedule, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: evenly spaced in sigma^(1/rho), then 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = ms.sigma_min ** (1 / rho), ms.sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def ddim(ms: ModelSchedule, steps: int) -> torch.Tensor:
    """DDIM's timesteps range(0, T, T // steps) + 1, clipped to T-1, ending at sigma(t=0), not at zero.

    This is the original DDIM sampler's rule, which the popular web UI keeps: when `steps` does not
    divide T it yields a few more timesteps than asked (30 -> 31); when it does, it equals diffusers'
    DDIMScheduler with the SD config ("leading" spacing, steps_offset 1).
    """
    T = len(ms.sigmas)
    if steps > T:
        raise ValueError(f"ddim schedule: at most {T} steps, got {steps}")
    t = (torch.arange(0, T, T // steps, dtype=torch.long) + 1).clamp(max=T - 1).flip(0)
    return torch.cat([ms.sigmas[t], ms.sigmas[:1]])


SCHEDULES: dict[str, Callable[[ModelSchedule, int], torch.Tensor]] = {
    "uniform": uniform,
    "karras": karras,
    "ddim": ddim,
}
SCHEDULE_LABELS = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "ddim": "DDIM"}


def canonical(name: str) -> str:
    """"DPM++ 2M Karras" -> "dpmpp_2m_karras": the form names and aliases are compared in."""
    return name.strip().lower().replace("+", "p").replace(" ", "_").replace("-", "_")


def resolve_schedule(name: str) -> str:
    """Accept `karras`, `Karras`, ... -> canonical name; unknown names are an error listing the valid ones."""
    key = canonical(name)
    if key in SCHEDULE_LABELS:
        return key
    raise ValueError(f"unknown schedule '{name}'; choose from {', '.join(SCHEDULE_LABELS)}")


def make_sigmas(ms: ModelSchedule, name: str, steps: int) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return SCHEDULES[name](ms, steps)
