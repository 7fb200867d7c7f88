"""Schedules and sigma <-> t conversions against k-diffusion, diffusers and ComfyUI/A1111; names."""

from __future__ import annotations

import subprocess
import sys
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from stablekit.diffusion import schedule as S
from stablekit.diffusion.samplers import find_sampler
from stablekit.diffusion.schedule import ModelSchedule, ddim, karras, make_sigmas, uniform
from stablekit.diffusion.schedule_names import SCHEDULE_LABELS, resolve_schedule

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


STEPS = [1, 2, 7, 20, 50]


def assert_same_schedule(ours: torch.Tensor, ref, rtol: float, atol: float) -> None:
    """Same length, same first / last non-zero / last sigma, and close everywhere."""
    ref = torch.as_tensor(np.asarray(ref, dtype=np.float64))
    assert ours.dtype == torch.float64 and ours.shape == ref.shape, (ours.shape, ref.shape)
    for i in (0, -2, -1):
        assert float(ours[i]) == pytest.approx(float(ref[i]), rel=rtol, abs=atol), i
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol)


@contextmanager
def default_dtype(dtype: torch.dtype):
    """k-diffusion builds its ramps in the default dtype: float64 lets it be compared at 1e-12."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name, kd_name, extra", [("karras", "get_sigmas_karras", {"rho": 7.0}),
                                                  ("exponential", "get_sigmas_exponential", {}),
                                                  ("polyexponential", "get_sigmas_polyexponential", {"rho": 1.0})])
def test_kdiffusion_schedules(ms, kdiffusion, name, kd_name, extra, steps):
    with default_dtype(torch.float64):
        ref = getattr(kdiffusion.sampling, kd_name)(steps, ms.sigma_min, ms.sigma_max, **extra)
    ours = make_sigmas(ms, name, steps)
    assert_same_schedule(ours, ref, rtol=1e-12, atol=0)
    assert float(ours[0]) == pytest.approx(ms.sigma_max, rel=1e-12) and ours[-1] == 0
    if steps > 1:
        assert float(ours[-2]) == pytest.approx(ms.sigma_min, rel=1e-12)


# --- ComfyUI comfy/samplers.py (A1111 modules/sd_schedulers.py is the same for these), transcribed in numpy ---
def comfy_model_sigmas() -> np.ndarray:
    """ModelSamplingDiscrete.sigmas: make_beta_schedule("linear") in float64, ascending in t."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def comfy_sigma(sigmas, t):
    """ModelSamplingDiscrete.sigma(t): log sigma interpolated linearly between trained timesteps."""
    return np.exp(np.interp(t, np.arange(len(sigmas)), np.log(sigmas)))


def comfy_timestep(sigmas, sigma):
    """ModelSamplingDiscrete.timestep(sigma): the nearest trained timestep in log sigma."""
    return int(np.abs(np.log(sigma) - np.log(sigmas)).argmin())


def comfy_normal(sigmas, steps, sgm=False):
    start, end = comfy_timestep(sigmas, sigmas[-1]), comfy_timestep(sigmas, sigmas[0])
    timesteps = np.linspace(start, end, steps + 1)[:-1] if sgm else np.linspace(start, end, steps)
    return [float(comfy_sigma(sigmas, t)) for t in timesteps] + [0.0]


def comfy_simple(sigmas, steps):
    ss = len(sigmas) / steps
    return [float(sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]


def comfy_ddim_uniform(sigmas, steps):
    sigs, x = [0.0], 1
    ss = max(len(sigmas) // steps, 1)
    while x < len(sigmas):
        sigs.append(float(sigmas[x]))
        x += ss
    return sigs[::-1]


def comfy_beta(sigmas, steps, alpha=0.6, beta=0.6):
    scipy_stats = pytest.importorskip("scipy.stats")
    total_timesteps = len(sigmas) - 1
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(scipy_stats.beta.ppf(ts, alpha, beta) * total_timesteps)
    sigs, last_t = [], -1
    for t in ts:
        if t != last_t:
            sigs.append(float(sigmas[int(t)]))
        last_t = t
    return sigs + [0.0]


COMFY = {"normal": comfy_normal, "sgm_uniform": lambda s, n: comfy_normal(s, n, sgm=True), "simple": comfy_simple,
         "ddim_uniform": comfy_ddim_uniform, "beta": comfy_beta}


@pytest.mark.parametrize("steps", STEPS + [30, 200])
@pytest.mark.parametrize("name", list(COMFY))
def test_comfyui_schedules(ms, name, steps):
    assert_same_schedule(make_sigmas(ms, name, steps), COMFY[name](comfy_model_sigmas(), steps), rtol=1e-12, atol=0)


def test_comfyui_schedules_lengths_and_end_points(ms):
    T = 1000
    assert len(S.ddim_uniform(ms, 7)) == 9 and len(S.ddim_uniform(ms, 30)) == 32  # more steps than asked, as ComfyUI
    first, last = float(S.ddim_uniform(ms, 20)[0]), float(S.ddim_uniform(ms, 20)[-2])
    assert first == float(ms.sigmas[951]) and last == float(ms.sigmas[1])
    assert len(S.beta(ms, 200)) < 201  # beta's flat ends repeat timesteps; the repeats are dropped
    for steps in (7, 20):
        assert float(S.simple(ms, steps)[0]) == ms.sigma_max  # a trained sigma; sgm_uniform's is exp(log(.))
        assert float(S.sgm_uniform(ms, steps)[0]) == pytest.approx(ms.sigma_max, rel=1e-15)
        assert float(S.simple(ms, steps)[-2]) == float(ms.sigmas[T - 1 - int((steps - 1) * T / steps)])
        assert float(S.sgm_uniform(ms, steps)[-2]) == pytest.approx(float(ms.t_to_sigma(torch.tensor(999 / steps))))
        torch.testing.assert_close(S.normal(ms, steps), uniform(ms, steps), rtol=1e-14, atol=0)  # both: 999 -> 0 in t


def test_beta_inverse_cdf_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    ps = np.concatenate([np.linspace(0, 1, 401), [1e-6, 1e-3, 0.5, 1 - 1e-3, 1 - 1e-6]])
    xs = np.linspace(0, 1, 101)
    for a, b in [(0.6, 0.6), (0.5, 2.0), (2.0, 5.0), (1.0, 1.0), (3.0, 0.7)]:
        ppf = np.array([S._beta_ppf(float(p), a, b) for p in ps])
        np.testing.assert_allclose(ppf, scipy_stats.beta.ppf(ps, a, b), rtol=1e-12, atol=1e-14)
        cdf = np.array([S._beta_cdf(float(x), a, b) for x in xs])
        np.testing.assert_allclose(cdf, scipy_stats.beta.cdf(xs, a, b), rtol=1e-12, atol=1e-14)


def test_scipy_is_not_a_runtime_dependency():
    code = ("import sys, stablekit.diffusion.schedule as s; s.beta(s.ModelSchedule(), 20); "
            "assert 'scipy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- diffusers' timestep spacings ---------------------------------------------------------------------------
def euler_sigmas(spacing: str, steps: int) -> torch.Tensor:
    with warnings.catch_warnings():  # diffusers' np.array(tensor) trips numpy 2's copy-keyword DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1, timestep_spacing=spacing, interpolation_type="linear")
        sched.set_timesteps(steps)
    return sched.sigmas


@pytest.mark.parametrize("steps", STEPS + [61, 1000])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_diffusers_spacings_match_euler_discrete(ms, spacing, steps):
    """diffusers computes in float32: agreement to its precision, and the same length and end points."""
    ours = make_sigmas(ms, spacing, steps)
    assert_same_schedule(ours, euler_sigmas(spacing, steps).double(), rtol=2e-5, atol=1e-7)
    assert ours[-1] == 0


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_diffusers_integer_spacings_match_at_every_step_count(ms, spacing):
    """Integer timesteps: the rounding of trailing's float arange (ties at .5, an extra t = -1) included."""
    for steps in range(1, 1001):
        ref = euler_sigmas(spacing, steps).double()
        ours = make_sigmas(ms, spacing, steps)
        assert ours.shape == ref.shape, steps
        torch.testing.assert_close(ours, ref, rtol=2e-5, atol=1e-7, msg=f"{spacing}, {steps} steps")


def test_diffusers_spacing_details(ms):
    assert float(S.leading(ms, 1)[0]) == float(ms.sigmas[1])  # one leading step starts at t = 1 ...
    assert float(S.linspace(ms, 1)[0]) == ms.sigma_min  # ... one linspace step at t = 0, as in diffusers
    assert float(S.trailing(ms, 7)[0]) == ms.sigma_max and float(S.trailing(ms, 7)[-2]) == float(ms.sigmas[142])
    assert len(S.trailing(ms, 61)) == 63 and float(S.trailing(ms, 61)[-2]) == ms.sigma_min  # diffusers' extra t = -1
    # linspace's fractional timesteps (7 steps: t = 832.5, ...): sigma interpolated linearly, not log-linearly
    expected = 0.5 * (float(ms.sigmas[832]) + float(ms.sigmas[833]))
    assert float(S.linspace(ms, 7)[1]) == pytest.approx(expected, rel=1e-14)
    assert expected != pytest.approx(float(ms.t_to_sigma(torch.tensor(832.5))), rel=1e-6)
    with pytest.raises(ValueError, match="at most 1000 steps"):
        S.leading(ms, 1001)


@pytest.mark.parametrize("name", list(S.SCHEDULES))
def test_every_schedule_is_float64_descending_and_ends_at_zero(ms, name):
    for steps in STEPS:
        sigmas = make_sigmas(ms, name, steps)
        assert sigmas.dtype == torch.float64 and (sigmas[1:] < sigmas[:-1]).all(), (name, steps)
        assert float(sigmas[-1]) == (ms.sigma_min if name == "ddim" else 0.0)
        if name not in ("ddim", "ddim_uniform", "beta"):
            assert len(sigmas) == steps + 1


def test_schedule_names_labels_and_aliases():
    assert set(SCHEDULE_LABELS) == set(S.SCHEDULES) | {"automatic"}
    for key, label in SCHEDULE_LABELS.items():
        for form in (key, key.upper(), label, label.lower(), label.upper(), f"  {label} "):
            assert resolve_schedule(form) == key, form
    assert resolve_schedule("SGMUniform") == resolve_schedule("sgmuniform") == "sgm_uniform"  # A1111's alias
    assert resolve_schedule("DDIM") == "ddim" and resolve_schedule("DDIM Uniform") == "ddim_uniform"
    assert find_sampler("DPM++ 2M SGM Uniform") == (find_sampler("DPM++ 2M")[0], "sgm_uniform")
    assert find_sampler("Euler Exponential") == (find_sampler("Euler")[0], "exponential")
    torch.testing.assert_close(make_sigmas(ModelSchedule(), "SGM Uniform", 7), S.sgm_uniform(ModelSchedule(), 7))


def test_unknown_schedule_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown schedule 'nope'; choose from") as err:
        resolve_schedule("nope")
    for key, label in SCHEDULE_LABELS.items():
        assert f"'{label}' ({key})" in str(err.value)
    with pytest.raises(ValueError, match="unknown schedule 'Karras2'"):
        make_sigmas(ModelSchedule(), "Karras2", 7)
    with pytest.raises(ValueError, match="automatic"):
        make_sigmas(ModelSchedule(), "automatic", 7)
