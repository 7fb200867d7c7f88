"""Noise levels: the model's discrete schedule, and the step schedules samplers walk.

Sigma space (Karras et al. 2022): x = x0 + sigma * noise. A discrete DDPM timestep t with
cumulative alpha a_t has sigma_t = sqrt((1 - a_t) / a_t); the variance-preserving latent is
x_vp = x / sqrt(1 + sigma^2). All schedules are float64 on the CPU, descending, and end at 0
(except `ddim`, which ends at sigma(t=0) as the DDIM sampler does).

A schedule is `(ms, steps) -> sigmas`, normally steps+1 long. Some follow their reference in
giving another length: `ddim` and `ddim_uniform` more when `steps` does not divide T, `beta` fewer
when timesteps repeat, and diffusers' `trailing` one more for 62 step counts in 1..1000.

Where each comes from: k-diffusion `get_sigmas_*` (uniform, karras, exponential, polyexponential);
ComfyUI comfy/samplers.py = A1111 modules/sd_schedulers.py (normal, sgm_uniform, simple, ddim_uniform;
beta as ComfyUI); the original DDIM sampler (ddim); diffusers EulerDiscreteScheduler with the SD
config (leading, linspace, trailing). T = 1000 training timesteps throughout.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..config import ScheduleConfig
from .schedule_names import resolve_schedule


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, alg. 1: shift and scale sqrt(a_t) so the last step has zero signal.

    The last a_t is then set to 2^-24 instead of 0, as diffusers' Euler scheduler does, so that
    sigma stays finite (about 4096) in sigma space.
    """
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    out = root**2
    out[-1] = 2.0**-24
    return out


class ModelSchedule:
    """The training schedule of a discrete-time model: sigma <-> t conversions."""

    def __init__(self, cfg: ScheduleConfig = ScheduleConfig()):
        betas = torch.linspace(cfg.linear_start**0.5, cfg.linear_end**0.5, cfg.timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # [T]
        if cfg.zero_terminal_snr:
            self.alphas_cumprod = zero_terminal_snr(self.alphas_cumprod)
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


def exponential(ms: ModelSchedule, steps: int) -> torch.Tensor:
    """Evenly spaced in log sigma from sigma_max to sigma_min, then 0 (k-diffusion `get_sigmas_exponential`)."""
    log_sigmas = torch.linspace(math.log(ms.sigma_max), math.log(ms.sigma_min), steps, dtype=torch.float64)
    return _append_zero(log_sigmas.exp())


def polyexponential(ms: ModelSchedule, steps: int, rho: float = 1.0) -> torch.Tensor:
    """Log sigma along a ramp**rho, then 0 (k-diffusion `get_sigmas_polyexponential`; rho 1 as A1111's default)."""
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** rho
    lo, hi = math.log(ms.sigma_min), math.log(ms.sigma_max)
    return _append_zero((ramp * (hi - lo) + lo).exp())


# t(sigma_max), t(sigma_min): ComfyUI takes the nearest trained timestep, A1111 k-diffusion's interpolated
# sigma_to_t; both are 999 and 0 for a discrete model.
def normal(ms: ModelSchedule, steps: int) -> torch.Tensor:
    """Evenly spaced in t from t(sigma_max) to t(sigma_min), then 0 (ComfyUI/A1111 `normal_scheduler`).

    For a discrete model these are the same sigmas as `uniform`.
    """
    start, end = ms.sigma_to_t(ms.sigma_max, quantize=True), ms.sigma_to_t(ms.sigma_min, quantize=True)
    return _append_zero(ms.t_to_sigma(torch.linspace(start, end, steps, dtype=torch.float64)))


def sgm_uniform(ms: ModelSchedule, steps: int) -> torch.Tensor:
    """`steps` of steps+1 evenly spaced t from t(sigma_max) down, the t(sigma_min) end left out, then 0
    (ComfyUI `normal_scheduler(sgm=True)`, A1111 `sgm_uniform`: the SGM / SDXL-Turbo spacing)."""
    start, end = ms.sigma_to_t(ms.sigma_max, quantize=True), ms.sigma_to_t(ms.sigma_min, quantize=True)
    return _append_zero(ms.t_to_sigma(torch.linspace(start, end, steps + 1, dtype=torch.float64)[:-1]))


def simple(ms: ModelSchedule, steps: int) -> torch.Tensor:
    """Every (T/steps)-th trained sigma from the top, then 0 (ComfyUI/A1111 `simple_scheduler`)."""
    T = len(ms.sigmas)
    stride = T / steps  # a float, truncated per step exactly as the reference does
    return _append_zero(ms.sigmas[[T - 1 - int(x * stride) for x in range(steps)]])


def ddim_uniform(ms: ModelSchedule, steps: int) -> torch.Tensor:
    """Trained sigmas at t = 1, 1 + T//steps, ... below T, descending, then 0 (ComfyUI `ddim_uniform`;
    A1111's "DDIM" schedule type).

    Unlike `ddim` it ends at 0, not at sigma(t=0), and never clips to T-1, so t = 999 is not repeated.
    Like `ddim` it walks more steps than asked when `steps` does not divide T (7 -> 8, 30 -> 31).
    """
    T = len(ms.sigmas)
    t = torch.arange(1, T, max(T // steps, 1)).flip(0)
    return _append_zero(ms.sigmas[t])


def _beta_cdf(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (Numerical Recipes 6.4)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean: use I_x(a,b) = 1 - I_{1-x}(b,a)
        return 1.0 - _beta_cdf(1.0 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300  # modified Lentz: keeps the convergents' denominators off zero
    c, d = 1.0, 1.0 / (1.0 - (a + b) * x / (a + 1) or tiny)
    h = d
    for m in range(1, 500):
        for coef in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even term d_2m
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd term d_2m+1
            d = 1.0 / (1.0 + coef * d or tiny)
            c = 1.0 + coef / c or tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return front * h


def _beta_ppf(p: float, a: float, b: float) -> float:
    """The beta distribution's inverse CDF (scipy.stats.beta.ppf) by bisection on `_beta_cdf`.

    Returns the upper end of the final bracket, so a tie such as ppf(0.5) = 0.5 for a == b never
    lands a hair below and rounds down where scipy rounds up.
    """
    if p <= 0.0 or p >= 1.0:
        return 0.0 if p <= 0.0 else 1.0
    lo, hi = 0.0, 1.0
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):  # the bracket is two adjacent floats
            return hi
        lo, hi = (mid, hi) if _beta_cdf(mid, a, b) < p else (lo, mid)


def beta(ms: ModelSchedule, steps: int, a: float = 0.6, b: float = 0.6) -> torch.Tensor:
    """Beta(a, b)-quantile timesteps, Lee et al. 2024 (arXiv:2407.12173), as ComfyUI's `beta_scheduler`.

    t_k = rint(ppf(1 - k/steps) * (T-1)), repeats dropped (so many steps can give fewer), trained sigmas,
    then 0. A1111's "Beta" differs: it spaces sigma itself, sigma_min + ppf * (sigma_max - sigma_min).
    """
    T = len(ms.sigmas)
    quantiles = [1.0 - k * (1.0 / steps) for k in range(steps)]  # numpy's 1 - linspace(0, 1, steps, endpoint=False)
    t = [round(_beta_ppf(q, a, b) * (T - 1)) for q in quantiles]  # round() is half-to-even, as np.rint
    return _append_zero(ms.sigmas[list(dict.fromkeys(t))])


def ddim(ms: ModelSchedule, steps: int) -> torch.Tensor:
    """DDIM's timesteps range(0, T, T // steps) + 1, clipped to T-1, ending at sigma(t=0), not at zero.

    This is the original DDIM sampler's rule, which the popular web UI's DDIM sampler keeps: when
    `steps` does not divide T it yields a few more timesteps than asked (30 -> 31); when it does, it
    equals diffusers' DDIMScheduler with the SD config ("leading" spacing, steps_offset 1). The
    `ddim_uniform` schedule takes the same timesteps (without the clip) but ends at sigma 0.
    """
    T = len(ms.sigmas)
    if steps > T:
        raise ValueError(f"ddim schedule: at most {T} steps, got {steps}")
    t = (torch.arange(0, T, T // steps, dtype=torch.long) + 1).clamp(max=T - 1).flip(0)
    return torch.cat([ms.sigmas[t], ms.sigmas[:1]])


# diffusers' spacings (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
# Table 2), computed with numpy exactly as EulerDiscreteScheduler.set_timesteps does: the rounding
# of trailing's float arange decides ties at .5 and its length, so the same float steps are kept.
def _diffusers_sigmas(ms: ModelSchedule, t: np.ndarray, name: str, steps: int) -> torch.Tensor:
    """Sigmas at fractional t interpolated linearly in sigma (np.interp, not log sigma, as diffusers' Euler), then 0."""
    T = len(ms.sigmas)
    if steps > T:
        raise ValueError(f"{name} schedule: at most {T} steps, got {steps}")
    sigmas = np.interp(t.astype(np.float64), np.arange(T), ms.sigmas.numpy())  # t outside [0, T-1] clamps
    return _append_zero(torch.from_numpy(sigmas))


def leading(ms: ModelSchedule, steps: int) -> torch.Tensor:
    """diffusers timestep_spacing="leading", steps_offset 1: t = k * (T // steps) + 1, descending, then 0.

    One step is t = 1 (sigma 0.04), as in diffusers.
    """
    t = (np.arange(0, steps) * (len(ms.sigmas) // steps)).round()[::-1] + 1
    return _diffusers_sigmas(ms, t, "leading", steps)


def linspace(ms: ModelSchedule, steps: int) -> torch.Tensor:
    """diffusers timestep_spacing="linspace": `steps` t evenly spaced from T-1 to 0 (fractional), then 0.

    One step is t = 0 (sigma_min), as in diffusers (np.linspace(0, T-1, 1) == [0]).
    """
    t = np.linspace(0, len(ms.sigmas) - 1, steps)[::-1]
    return _diffusers_sigmas(ms, t, "linspace", steps)


def trailing(ms: ModelSchedule, steps: int) -> torch.Tensor:
    """diffusers timestep_spacing="trailing": t = round(T - k * T/steps) - 1, from T-1 down, then 0.

    For 62 step counts in 1..1000 (61, 103, ...) numpy's float arange yields one more t, -1, which
    diffusers keeps (its sigma clamps to sigma_min); so do we.
    """
    T = len(ms.sigmas)
    t = np.arange(T, 0, -T / steps).round() - 1
    return _diffusers_sigmas(ms, t, "trailing", steps)


def lcm(ms: ModelSchedule, steps: int, original_steps: int = 50) -> torch.Tensor:
    """diffusers' LCMScheduler (Luo et al. 2023): the distillation grid t = k * (T // 50) - 1, k = 1..50,
    descending, taken at floor(linspace(0, 50, steps, endpoint=False)), then 0."""
    T = len(ms.sigmas)
    if steps > original_steps:
        raise ValueError(f"lcm schedule: at most {original_steps} steps (the distillation grid), got {steps}")
    grid = (np.arange(1, original_steps + 1) * (T // original_steps) - 1)[::-1]
    idx = np.floor(np.linspace(0, original_steps, num=steps, endpoint=False)).astype(np.int64)
    return _append_zero(ms.sigmas[torch.from_numpy(grid[idx].copy())])


SCHEDULES: dict[str, Callable[[ModelSchedule, int], torch.Tensor]] = {
    "uniform": uniform,
    "karras": karras,
    "exponential": exponential,
    "polyexponential": polyexponential,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "normal": normal,
    "ddim": ddim,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "leading": leading,
    "linspace": linspace,
    "trailing": trailing,
    "lcm": lcm,
}
def make_sigmas(ms: ModelSchedule, name: str, steps: int) -> torch.Tensor:
    """The sigmas of schedule `name` (any form resolve_schedule accepts) for `steps` steps."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    key = resolve_schedule(name)
    if key == "automatic":
        raise ValueError("schedule 'automatic' means the sampler's default: resolve it with the sampler first")
    return SCHEDULES[key](ms, steps)
