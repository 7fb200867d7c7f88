"""Sampler math on an analytic denoiser: Gaussian data, where the exact x0 estimate is known.

Data x0 ~ N(mu, s^2) per element, so D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2), and the
probability-flow ODE has the closed form x(sigma) = mu + (x_T - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2).
"""

from __future__ import annotations

import math

import pytest
import torch

from stablekit.diffusion.samplers import find_sampler
from stablekit.diffusion.schedule import ModelSchedule, make_sigmas

MU, S = 0.3, 0.5


def exact_denoiser(x: torch.Tensor, sigma) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
    return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


def start(seed: int = 0, batch: int = 2) -> tuple[torch.Tensor, list[torch.Generator]]:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    x = torch.stack([torch.randn(4, 8, 8, generator=g) for g in generators]).double()
    return x, generators


@pytest.mark.parametrize(
    "name, kd_name, schedule",
    [("Euler", "sample_euler", "uniform"), ("DPM++ 2M", "sample_dpmpp_2m", "karras"),
     ("DPM++ 2M", "sample_dpmpp_2m", "uniform"), ("Euler a", "sample_euler_ancestral", "karras"),
     ("DDIM", "sample_euler", "ddim")],
)
def test_samplers_match_kdiffusion_on_the_exact_denoiser(kdiffusion, name, kd_name, schedule):
    spec = find_sampler(name)[0]
    sigmas = make_sigmas(ModelSchedule(), schedule, 12)
    noise, generators = start()
    x = noise * float(sigmas[0])
    ours = spec.fn(exact_denoiser, x.clone(), sigmas, generator=generators)

    _, kd_generators = start()  # same streams, already advanced past the initial noise as ours were
    extra = {}
    if kd_name == "sample_euler_ancestral":
        extra["noise_sampler"] = lambda s, s_next: torch.stack(
            [torch.randn(4, 8, 8, generator=g) for g in kd_generators]).double()
    ref = getattr(kdiffusion.sampling, kd_name)(exact_denoiser, x.clone(), sigmas, disable=True, **extra)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name, order", [("Euler", 1), ("DPM++ 2M", 2)])
def test_ode_samplers_converge_to_the_closed_form_at_their_order(name, order):
    noise, _ = start()
    errors = []
    for steps in (40, 80, 160):
        # Stop at sigma_min: the final jump to 0 is one first-order step whatever the step count.
        sigmas = make_sigmas(ModelSchedule(), "karras", steps)[:-1]
        x_t = noise * float(sigmas[0])
        out = find_sampler(name)[0].fn(exact_denoiser, x_t.clone(), sigmas)
        ratio = math.sqrt(S**2 + float(sigmas[-1]) ** 2) / math.sqrt(S**2 + float(sigmas[0]) ** 2)
        exact = MU + (x_t - MU) * ratio
        errors.append((out - exact).abs().max().item())
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]  # doubling the steps divides by 2^order
    assert all(abs(r - order) < 0.35 for r in rates), (errors, rates)


def test_ancestral_sampler_draws_from_the_data_distribution():
    sigmas = make_sigmas(ModelSchedule(), "karras", 200)
    generators = [torch.Generator().manual_seed(1)]
    x = torch.randn(1, 64, 64, 64, generator=generators[0]).double() * float(sigmas[0])
    out = find_sampler("Euler a")[0].fn(exact_denoiser, x, sigmas, generator=generators)
    assert abs(out.mean().item() - MU) < 0.01 and abs(out.std().item() - S) < 0.01


def test_ddim_eta_is_the_ancestral_step_with_ddim_noise():
    """DDIM's sigma_t (Song et al. eq. 16) rescaled to sigma space equals the ancestral sigma_up."""
    from stablekit.diffusion.k_samplers import ancestral_step

    ms = ModelSchedule()
    t, t_prev, eta = 501, 451, 0.8
    a_t, a_prev = float(ms.alphas_cumprod[t]), float(ms.alphas_cumprod[t_prev])
    sigma_ddim = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    _, up = ancestral_step(float(ms.sigmas[t]), float(ms.sigmas[t_prev]), eta)
    assert up == pytest.approx(sigma_ddim / math.sqrt(a_prev), rel=1e-12)
