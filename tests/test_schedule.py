"""Schedules and sigma <-> t conversions against k-diffusion and diffusers; sampler names."""

from __future__ import annotations

import pytest
import torch

from stablekit.diffusion.samplers import find_sampler
from stablekit.diffusion.schedule import ModelSchedule, ddim, karras, make_sigmas, resolve_schedule, uniform

diffusers = pytest.importorskip("diffusers")
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)


@pytest.fixture(scope="module")
def ms():
    return ModelSchedule()


@pytest.fixture(scope="module")
def kd_denoiser(kdiffusion):
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("alphas_cumprod", diffusers.DDIMScheduler(**SD_SCHEDULER).alphas_cumprod)

    return kdiffusion.external.CompVisDenoiser(Model())


def test_training_sigmas_match_diffusers(ms):
    ref = diffusers.DDIMScheduler(**SD_SCHEDULER).alphas_cumprod
    torch.testing.assert_close(ms.alphas_cumprod.float(), ref, atol=1e-6, rtol=1e-5)
    assert abs(ms.sigma_min - 0.029167) < 1e-5 and abs(ms.sigma_max - 14.6146) < 1e-3


@pytest.mark.parametrize("steps", [1, 2, 8, 20, 37])
def test_uniform_matches_kdiffusion_get_sigmas(ms, kd_denoiser, steps):
    torch.testing.assert_close(uniform(ms, steps).float(), kd_denoiser.get_sigmas(steps), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 5, 20])
def test_karras_matches_kdiffusion(ms, kdiffusion, steps):
    ref = kdiffusion.sampling.get_sigmas_karras(steps, ms.sigma_min, ms.sigma_max, rho=7.0)
    torch.testing.assert_close(karras(ms, steps).float(), ref.float(), atol=1e-6, rtol=1e-6)
    assert karras(ms, steps)[-1] == 0 and abs(float(karras(ms, steps)[0]) - ms.sigma_max) < 1e-9


@pytest.mark.parametrize("steps", [1, 8, 20, 50, 125])
def test_ddim_timesteps_match_diffusers_when_steps_divide_1000(ms, steps):
    sched = diffusers.DDIMScheduler(**SD_SCHEDULER)
    sched.set_timesteps(steps)
    sigmas = ddim(ms, steps)
    ts = [round(ms.sigma_to_t(float(s))) for s in sigmas[:-1]]
    assert ts == sched.timesteps.tolist()
    assert float(sigmas[-1]) == pytest.approx(ms.sigma_min)  # DDIM ends at t = 0, not at sigma 0


@pytest.mark.parametrize("steps", [30, 1000])
def test_ddim_timesteps_follow_the_original_rule_otherwise(ms, steps):
    """The original DDIM sampler and the web UI: range(0, 1000, 1000 // steps) + 1, clipped to 999."""
    expected = [min(t + 1, 999) for t in range(0, 1000, 1000 // steps)][::-1]
    ts = [round(ms.sigma_to_t(float(s))) for s in ddim(ms, steps)[:-1]]
    assert ts == expected  # 30 steps -> 31 timesteps; 1000 steps repeat t = 999


@pytest.mark.parametrize("sigma", [0.0292, 0.1, 1.0, 3.3, 14.6])
def test_sigma_to_t_matches_kdiffusion(ms, kd_denoiser, sigma):
    ref = kd_denoiser.sigma_to_t(torch.tensor(sigma)).item()
    assert ms.sigma_to_t(sigma) == pytest.approx(ref, abs=2e-3)
    t = torch.tensor(ms.sigma_to_t(sigma), dtype=torch.float64)
    assert float(ms.t_to_sigma(t)) == pytest.approx(sigma, rel=1e-9)


def test_names():
    assert find_sampler("DPM++ 2M")[0].name == find_sampler("dpmpp_2m")[0].name == "DPM++ 2M"
    assert find_sampler("Euler a")[0].name == find_sampler("k_euler_a")[0].name == "Euler a"
    assert find_sampler("DPM++ 2M Karras") == (find_sampler("DPM++ 2M")[0], "karras")
    assert resolve_schedule("Karras") == "karras"
    with pytest.raises(ValueError, match="unknown sampler 'nope'; choose from .*'Euler a'"):
        find_sampler("nope")
    with pytest.raises(ValueError, match="unknown schedule"):
        resolve_schedule("nope")
    with pytest.raises(ValueError, match="at least 1"):
        make_sigmas(ModelSchedule(), "karras", 0)
