"""Samplers in sigma space following k-diffusion (Crowson), as the popular web UI runs them.

Each one is checked against k-diffusion's `sample_*` of the same name (tests/test_samplers.py, test_k_samplers.py).

| name            | symbol                                                              |
|-----------------|---------------------------------------------------------------------|
| d               | dx/dsigma = (x - x0) / sigma, the probability-flow ODE (Karras)     |
| lambda, h       | -log sigma (half log-SNR, Lu et al.), h = lambda_next - lambda       |
| down, up        | ancestral split: deterministic step to sigma_down, noise sigma_up   |
| eta             | noise scale: 0 = the ODE solver, 1 = the full ancestral / SDE noise |
| denoised_1, _2  | the x0 estimates one and two steps back (multistep methods)         |
| r, r0, r1       | multistep: earlier steps over this one, h_prev / h; DPM++ SDE: r is |
|                 | the fraction of the step to its intermediate point                  |
"""

from __future__ import annotations

import math

import torch

from .brownian import NoiseSampler, brownian_noise
from .common import Callback, Generators, randn_like, report
from .denoiser import Denoise


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split a step into a deterministic part down to sigma_down and fresh noise sigma_up."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def first_order_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_to: float) -> torch.Tensor:
    """DPM-Solver++(1) (Lu et al. 2022), the exact step of the ODE with a frozen x0 estimate:
    x_to = (sigma_to / sigma) x + (1 - sigma_to / sigma) x0, i.e. a DDIM step (-expm1(-h) = 1 - sigma_to / sigma)."""
    ratio = sigma_to / sigma
    return ratio * x + (1 - ratio) * denoised


def sample_euler(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler method on the probability-flow ODE (Karras et al. 2022, alg. 2 without churn)."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
        report(callback, i, len(s) - 1, denoised)
    return x


def sample_euler_ancestral(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators,
    callback: Callback | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion "Euler a")."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        down, up = ancestral_step(s[i], s[i + 1], eta)
        x = x + (x - denoised) / s[i] * (down - s[i])
        if up > 0:
            x = x + randn_like(x, generator) * (s_noise * up)
        report(callback, i, len(s) - 1, denoised)
    return x


def sample_dpmpp_2m(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022: second-order multistep in lambda = -log sigma."""
    s = sigmas.tolist()
    old_denoised = None
    h_last = 0.0
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        if s[i + 1] == s[i]:  # a repeated sigma (the DDIM schedule at 1000 steps) is no step
            pass
        elif s[i + 1] == 0:  # last step to zero: the estimate itself
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            if old_denoised is None:
                d = denoised
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
            h_last = h
        if s[i + 1] != s[i]:
            old_denoised = denoised
        report(callback, i, len(s) - 1, denoised)
    return x


def _lms_coefficients(t: list[float], i: int, order: int) -> list[float]:
    """Adams-Bashforth weights on uneven nodes: the integrals over [t_i, t_i+1] of the Lagrange
    basis polynomials l_j on the nodes t_i, t_i-1, ..., t_i-order+1, integrated exactly."""
    h = t[i + 1] - t[i]
    roots = [t[i - k] - t[i] for k in range(order)]  # the nodes in u = tau - t_i, well conditioned
    weights = []
    for j in range(order):
        poly, denom = [1.0], 1.0  # l_j(u) = prod_{k != j} (u - roots_k) / (roots_j - roots_k), low degree first
        for k in range(order):
            if k != j:
                poly = [(poly[n - 1] if n else 0.0) - roots[k] * (poly[n] if n < len(poly) else 0.0)
                        for n in range(len(poly) + 1)]
                denom *= roots[j] - roots[k]
        weights.append(sum(c * h ** (n + 1) / (n + 1) for n, c in enumerate(poly)) / denom)
    return weights


def sample_lms(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
    callback: Callback | None = None, order: int = 4,
) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth) on the probability-flow ODE in sigma (Crowson, k-diffusion "LMS")."""
    s = sigmas.tolist()
    nodes: list[float] = []  # sigmas where the stored slopes were taken, oldest first
    ds: list[torch.Tensor] = []  # dx/dsigma at those sigmas
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        if s[i + 1] != s[i]:  # a repeated sigma is no step (and would make the nodes coincide)
            nodes, ds = (nodes + [s[i]])[-order:], (ds + [(x - denoised) / s[i]])[-order:]
            weights = _lms_coefficients(nodes + [s[i + 1]], len(nodes) - 1, len(nodes))
            x = x + sum(w * d for w, d in zip(weights, reversed(ds)))  # weight j goes with the slope j steps back
        report(callback, i, len(s) - 1, denoised)
    return x


def sample_heun(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, alg. 1)."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        d = (x - denoised) / s[i]  # dx/dsigma at sigma_i
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:  # the slope at sigma 0 is undefined: the last step is Euler
            x = x + d * dt
        else:
            x_2 = x + d * dt  # Euler predictor
            d_2 = (x_2 - denoiser(x_2, s[i + 1])) / s[i + 1]
            x = x + (d + d_2) / 2 * dt  # trapezoidal corrector
        report(callback, i, len(s) - 1, denoised)
    return x


def _dpm2_step(
    denoiser: Denoise, x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_to: float
) -> torch.Tensor:
    """DPM-Solver-2 in sigma: the slope at the log-midpoint sigma_mid = sqrt(sigma * sigma_to) takes the step."""
    d = (x - denoised) / sigma
    if sigma_to == 0:  # no midpoint on the way to 0: Euler
        return x + d * (sigma_to - sigma)
    sigma_mid = math.exp((math.log(sigma) + math.log(sigma_to)) / 2)
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = (x_2 - denoiser(x_2, sigma_mid)) / sigma_mid
    return x + d_2 * (sigma_to - sigma)


def sample_dpm_2(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver-2 (Lu et al. 2022, alg. 1) midpoint steps in sigma, as k-diffusion's "DPM2"."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        x = _dpm2_step(denoiser, x, denoised, s[i], s[i + 1])
        report(callback, i, len(s) - 1, denoised)
    return x


def sample_dpm_2_ancestral(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators,
    callback: Callback | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver-2 (Lu et al. 2022) step down to sigma_down, then fresh noise up to sigma_next ("DPM2 a")."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        down, up = ancestral_step(s[i], s[i + 1], eta)
        x = _dpm2_step(denoiser, x, denoised, s[i], down)
        if down > 0:  # k-diffusion adds noise only after a midpoint step
            x = x + randn_like(x, generator) * (s_noise * up)
        report(callback, i, len(s) - 1, denoised)
    return x


def sample_dpmpp_2s_ancestral(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators,
    callback: Callback | None = None, eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2S), Lu et al. 2022 (alg. 1, r = 1/2), down to sigma_down, then fresh noise ("DPM++ 2S a")."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        down, up = ancestral_step(s[i], s[i + 1], eta)
        if down == 0:  # last step to zero: Euler, i.e. the estimate itself
            x = x + (x - denoised) / s[i] * (down - s[i])
        else:
            sigma_mid = math.exp((math.log(s[i]) + math.log(down)) / 2)  # halfway in lambda = -log sigma
            x_2 = first_order_step(x, denoised, s[i], sigma_mid)
            x = first_order_step(x, denoiser(x_2, sigma_mid), s[i], down)  # full step with the midpoint estimate
        if s[i + 1] > 0:  # drawn whenever k-diffusion draws, so the noise streams stay aligned
            x = x + randn_like(x, generator) * (s_noise * up)
        report(callback, i, len(s) - 1, denoised)
    return x


def _noise_for(
    x: torch.Tensor, sigmas: torch.Tensor, seeds: list[int] | None, noise_sampler: NoiseSampler | None
) -> NoiseSampler:
    """The given noise sampler, else the web UI's Brownian tree over this schedule from the images' seeds."""
    return noise_sampler if noise_sampler is not None else brownian_noise(x, sigmas, seeds)


def sample_dpmpp_sde(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
    callback: Callback | None = None, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5,
    seeds: list[int] | None = None, noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """DPM-Solver++ (Lu et al. 2022), 2nd-order singlestep with ancestral noise in both stages (k-diffusion "DPM++ SDE")."""
    noise = _noise_for(x, sigmas, seeds, noise_sampler) if eta else None
    s = sigmas.tolist()
    # The step works in lambda = -log sigma, computed in the schedule's dtype as k-diffusion does: the
    # Brownian tree is queried at these sigmas and moves by ~sqrt(dt) when its times move by dt.
    lam = sigmas.log().neg()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        if s[i + 1] == 0:  # last step to zero: Euler, i.e. the estimate itself
            x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
        elif s[i + 1] != s[i]:  # a repeated sigma is no step
            lam_r = lam[i] + (lam[i + 1] - lam[i]) * r  # a fraction r of the way
            sigma, sigma_next, sigma_r = (float(v.neg().exp()) for v in (lam[i], lam[i + 1], lam_r))
            # Stage 1: first-order step to sigma_r (down, then noise back up).
            down, up = ancestral_step(sigma, sigma_r, eta)
            x_2 = first_order_step(x, denoised, sigma, down)
            if up > 0:
                x_2 = x_2 + noise(sigma, sigma_r) * (s_noise * up)
            denoised_2 = denoiser(x_2, sigma_r)
            # Stage 2: the full step with the estimates mixed as in DPM-Solver++(2S).
            down, up = ancestral_step(sigma, sigma_next, eta)
            fac = 1 / (2 * r)
            mixed = (1 - fac) * denoised + fac * denoised_2
            x = first_order_step(x, mixed, sigma, down)
            if up > 0:
                x = x + noise(sigma, sigma_next) * (s_noise * up)
        report(callback, i, len(s) - 1, denoised)
    return x


def sample_dpmpp_2m_sde(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
    callback: Callback | None = None, eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint",
    seeds: list[int] | None = None, noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """SDE-DPM-Solver++(2M), Lu et al. 2022: 2nd-order multistep data prediction with eta-scaled noise."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"unknown solver_type '{solver_type}'; choose midpoint or heun")
    noise = _noise_for(x, sigmas, seeds, noise_sampler) if eta else None
    s = sigmas.tolist()
    old_denoised, h_last = None, 0.0
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        if s[i + 1] == 0:  # last step to zero: the estimate itself
            x = denoised
        elif s[i + 1] != s[i]:  # a repeated sigma is no step
            h = math.log(s[i]) - math.log(s[i + 1])
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)  # 1 - e^{-(1 + eta) h}
            x = (s[i + 1] / s[i]) * math.exp(-eta_h) * x + phi * denoised
            if old_denoised is not None:  # second-order correction from the previous estimate
                r = h_last / h
                if solver_type == "heun":
                    x = x + (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * phi * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise(s[i], s[i + 1]) * (s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
            h_last = h
        if s[i + 1] != s[i]:
            old_denoised = denoised
        report(callback, i, len(s) - 1, denoised)
    return x


def sample_dpmpp_3m_sde(
    denoiser: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
    callback: Callback | None = None, eta: float = 1.0, s_noise: float = 1.0,
    seeds: list[int] | None = None, noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: Lu et al. 2022's multistep method at 3rd order, in k-diffusion's SDE form (Crowson)."""
    noise = _noise_for(x, sigmas, seeds, noise_sampler) if eta else None
    s = sigmas.tolist()
    denoised_1 = denoised_2 = None  # the estimates one and two steps back
    h_1 = h_2 = 0.0  # and the steps that followed them
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        if s[i + 1] == 0:  # last step to zero: the estimate itself
            x = denoised
        elif s[i + 1] != s[i]:  # a repeated sigma is no step
            h = math.log(s[i]) - math.log(s[i + 1])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if denoised_2 is not None:  # third order: first and second divided differences in lambda
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2  # phi_3 = phi_2 / h_eta - 1/2
            elif denoised_1 is not None:  # second order
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                x = x + noise(s[i], s[i + 1]) * (s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
            h_1, h_2 = h, h_1
        if s[i + 1] != s[i]:
            denoised_1, denoised_2 = denoised, denoised_1
        report(callback, i, len(s) - 1, denoised)
    return x
