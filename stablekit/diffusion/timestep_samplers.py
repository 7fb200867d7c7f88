"""Samplers defined on the model's trained timesteps (DDIM family), written in sigma space.

They all start from unit-variance noise x_T, as the original implementations and diffusers do
(vp_start). In sigma space x = x_vp * sqrt(1 + sigma^2), and a step of the original from
alphas_cumprod a_t to a_t' divided by sqrt(a_t') becomes a step from sigma to sigma'; every
formula below is the original one after that division.

| name      | symbol                                                                       |
|-----------|------------------------------------------------------------------------------|
| s, s_next | sigma_t = sqrt((1 - a_t) / a_t), sigma_t' (a_t: alphas_cumprod at timestep t) |
| denoised  | x0 estimate D(x, s)                                                          |
| eps       | (x - D) / s, the model's noise estimate (for v models too)                  |
| x_vp      | x / sqrt(1 + s^2), the variance-preserving sample x_t of the papers          |

References followed, and what "automatic" walks (each matches that reference's timesteps):
  DDIM  CompVis DDIMSampler = diffusers DDIMScheduler   "ddim": DDIM timesteps, last step to t=0
  PLMS  CompVis PLMSSampler (not diffusers' PNDM for v) "ddim"
  DDPM  diffusers DDPMScheduler (fixed_small)           "leading" (steps_offset 1), last step to 0
  UniPC diffusers UniPCMultistepScheduler (bh2, order 2) "leading" of steps+1, penultimate dropped
  LCM   diffusers LCMScheduler                           "lcm": 50 distillation steps, subsampled
"""

from __future__ import annotations

import math

import torch

from .common import Callback, Generators, randn_like, report
from .denoiser import Denoise
from .k_samplers import sample_euler, sample_euler_ancestral
from .schedule import ModelSchedule


def sample_ddim(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
    callback: Callback | None = None, eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2020). In sigma space its step is an ancestral Euler step whose noise
    sigma_up = eta * sqrt(s'^2 (s^2 - s'^2) / s^2) is exactly DDIM's sigma_t rescaled, so eta 0
    is the deterministic DDIM and eta 1 is DDPM-like."""
    if eta == 0:
        return sample_euler(denoiser, x, sigmas, callback=callback)
    return sample_euler_ancestral(denoiser, x, sigmas, generator=generator, callback=callback, eta=eta)


# Adams-Bashforth coefficients for eps_i, eps_{i-1}, ... by history length (PNDM eq. 12).
_ADAMS_BASHFORTH = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def sample_plms(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """PLMS, the pseudo linear multistep method (Liu et al. 2022, PNDM), as CompVis's PLMSSampler.

    A DDIM step with eps' in place of eps, which in sigma space is x' = x + (s' - s) eps'
    (the "pseudo" part: the DDIM transfer instead of a plain ODE step in t). eps' combines the
    last four eps by 4th-order Adams-Bashforth; with less history, lower orders. The first step
    has none, so it is the pseudo improved Euler (Heun): eps' = (eps(x) + eps(x_euler)) / 2.

    Equals diffusers' PNDMScheduler(skip_prk_steps=True) for eps models. For v models diffusers
    combines the raw v outputs and converts once, so it differs; CompVis and the web UI (and this)
    combine eps per evaluation. Quirk not copied: for one step CompVis evaluates the Heun
    correction at the same timestep t; here it is at the next sigma.
    """
    s = sigmas.tolist()
    history: list[torch.Tensor] = []  # eps at earlier steps, newest first, at most 3
    for i in range(len(s) - 1):
        eps = (x - denoiser(x, s[i])) / s[i]
        if history:
            coeffs = _ADAMS_BASHFORTH[len(history) + 1]
            eps_prime = sum(c * e for c, e in zip(coeffs, [eps, *history]))
        elif s[i + 1] > 0:  # pseudo improved Euler
            x_euler = x + (s[i + 1] - s[i]) * eps
            eps_prime = (eps + (x_euler - denoiser(x_euler, s[i + 1])) / s[i + 1]) / 2
        else:  # a single step to sigma 0 has no second point to evaluate
            eps_prime = eps
        report(callback, i, len(s) - 1, x - s[i] * eps_prime)
        x = x + (s[i + 1] - s[i]) * eps_prime
        history = [eps, *history][:3]
    return x


def sample_ddpm(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, alg. 2) with the posterior variance beta~ ("fixed_small").

    The posterior q(x_t' | x_t, x0) divided by sqrt(a_t') is, with r = s'^2 / s^2,
        mean = r x + (1 - r) D,   std = s' sqrt(1 - r)
    (Euler a with eta 1 is the same step). No noise when s' = 0: diffusers' last step to
    alphas_cumprod 1 adds noise of std 1e-10 only.
    """
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        r = (s[i + 1] / s[i]) ** 2
        x = r * x + (1 - r) * denoised
        if s[i + 1] > 0:
            x = x + randn_like(x, generator) * (s[i + 1] * math.sqrt(1 - r))
        report(callback, i, len(s) - 1, denoised)
    return x


def _unipc_coefficients(rks: list[float], h: float, order: int) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """UniPC's B(h) = expm1(-h) ("bh2"), h phi_1(-h), and R, b of the order conditions (Zhao et al. eq. 8):
    R[k][j] = r_j^k, b[k] = h phi_{k+2}(-h) (k+1)! / B(h), with r = (lambda_j - lambda_0) / h, last r = 1."""
    hh = -h  # data prediction: the exponential integrator runs in -lambda
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1
    r = torch.tensor([*rks, 1.0], dtype=torch.float64)
    rows, b = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        rows.append(r ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return b_h, h_phi_1, torch.stack(rows), torch.tensor(b, dtype=torch.float64)


def _unipc_update(
    x: torch.Tensor, m: list[torch.Tensor], lam: list[float], lam_to: float, sigma_ratio: float, order: int,
    model_to: torch.Tensor | None = None,
) -> torch.Tensor:
    """One UniP predictor step (model_to None) or UniC corrector step, from the sample x at lam[0] to lam_to.

    m: x0 estimates, newest first (m[0] at lam[0]). The corrector adds model_to, the x0 estimate at
    the predicted point, to the order conditions, which makes it one order more accurate.
    """
    h = lam_to - lam[0]
    n_old = order - 1  # earlier estimates the update uses
    rks = [(lam[k] - lam[0]) / h for k in range(1, n_old + 1)] if math.isfinite(h) else []
    d1s = [(m[k] - m[0]) / rk for k, rk in zip(range(1, n_old + 1), rks)]
    b_h, h_phi_1, R, b = _unipc_coefficients(rks, h, order)
    x_to = sigma_ratio * x - h_phi_1 * m[0]  # the DPM-Solver++(1) / DDIM part
    if model_to is None:  # predictor
        if not d1s:
            return x_to
        rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        return x_to - b_h * sum(rho * d for rho, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    res = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), torch.zeros_like(x))
    return x_to - b_h * (res + rhos[-1] * (model_to - m[0]))


def sample_unipc(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
    callback: Callback | None = None, order: int = 2,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): multistep UniP predictor with the UniC corrector, data prediction,
    B(h) = expm1(-h) ("bh2"), as diffusers' UniPCMultistepScheduler with its defaults.

    In sigma space alpha = 1 and lambda = -log sigma. The corrector reuses the estimate at the
    predicted point (no extra evaluation); the first steps and the last ("lower_order_final") run at
    lower order, and the last step to sigma 0 returns the x0 estimate.
    """
    s = sigmas.tolist()
    n = len(s) - 1
    lam = [-math.log(v) if v > 0 else math.inf for v in s]
    m: list[torch.Tensor] = []  # x0 estimates, newest first
    x_prev, order_prev = x, 0
    for i in range(n):
        denoised = denoiser(x, s[i])
        if i > 0:  # correct the predicted x with the estimate there, at the predictor's order
            x = _unipc_update(x_prev, m, lam[i - 1 :: -1], lam[i], s[i] / s[i - 1], order_prev, denoised)
        m = [denoised, *m][:order]
        this_order = min(order, n - i, i + 1) if s[i + 1] > 0 else 1
        x_prev, order_prev = x, this_order
        x = _unipc_update(x, m, lam[i::-1], lam[i + 1], s[i + 1] / s[i], this_order)
        report(callback, i, n, denoised)
    return x


# LCM's consistency-model parameterisation (Song et al. 2023 app. C; Luo et al. 2023 eq. 9).
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0


def sample_lcm(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators,
    callback: Callback | None = None, model_schedule: ModelSchedule,
) -> torch.Tensor:
    """LCM multi-step sampling (Luo et al. 2023, alg. 1), as diffusers' LCMScheduler.

    Each step maps x to the consistency function's output f(x, t) = c_skip(t) x_vp + c_out(t) D,
    with the boundary-condition scalings of the trained timestep t (scaled by 10), then re-noises
    it to the next sigma with fresh noise; the last step returns f itself. For an LCM-distilled
    model c_skip ~ 0 and c_out ~ 1 except near t = 0.
    """
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        t = model_schedule.sigma_to_t(s[i]) * LCM_TIMESTEP_SCALING
        c_skip = LCM_SIGMA_DATA**2 / (t**2 + LCM_SIGMA_DATA**2)
        c_out = t / math.sqrt(t**2 + LCM_SIGMA_DATA**2)
        x = c_skip * x / math.sqrt(1 + s[i] ** 2) + c_out * denoised  # c_skip applies to the VP sample
        report(callback, i, len(s) - 1, x)
        if s[i + 1] > 0:
            x = x + randn_like(x, generator) * s[i + 1]
    return x
