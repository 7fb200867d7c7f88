"""PLMS, DDPM, UniPC and LCM against diffusers' schedulers and CompVis's PLMS sampler.

(a) On the analytic Gaussian denoiser (exact x0), written as an eps model in the VP space diffusers
    steps in, with the same timesteps, float64 and the same per-image noise streams.
(b) End to end on the tiny models (SD1 eps, SD2 v), batch 2 with per-image seeds, against diffusers'
    StableDiffusionPipeline with that scheduler, as test_parity does for DDIM.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import stablekit
from stablekit.diffusion.samplers import find_sampler
from stablekit.diffusion.schedule import SCHEDULES, ModelSchedule, make_sigmas
from stablekit.pipeline.steps import sampler_sigmas

from .test_parity import (
    NEGATIVE,
    PROMPT,
    H,
    W,
    _diffusers,
    _ours,
    assert_close_pictures,
    pair,
    reference_embeddings,
)

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_ddpm, scheduling_lcm
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["pair"]  # the fixture, shared with test_parity

MU, S = 0.3, 0.5
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
      "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False, "timestep_spacing": "leading"}


def exact_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Data x0 ~ N(MU, S^2) per element: D(x, sigma) = E[x0 | x0 + sigma n = x]."""
    return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


def make_scheduler(name: str, prediction: str = "epsilon"):
    cls = {"plms": diffusers.PNDMScheduler, "ddpm": diffusers.DDPMScheduler,
           "unipc": diffusers.UniPCMultistepScheduler, "lcm": diffusers.LCMScheduler}[name]
    extra = {"skip_prk_steps": True} if name == "plms" else {}
    return cls.from_config({**SD, **extra, "prediction_type": prediction})


def diffusers_sigmas(name: str, scheduler, ms: ModelSchedule) -> torch.Tensor:
    """The sigma list our sampler walks for the scheduler's timesteps: sigma_t, then where the last step lands."""
    t = list(dict.fromkeys(scheduler.timesteps.tolist()))  # PNDM repeats one timestep (its Heun step)
    last = ms.sigmas[:1] if name == "plms" else torch.zeros(1, dtype=torch.float64)  # PNDM: alphas_cumprod[0]
    return torch.cat([ms.sigmas[t], last])


def float64_reference(scheduler, ms: ModelSchedule) -> None:
    """Give the reference the same float64 schedule, so the comparison is of the algorithms, not of float32."""
    scheduler.alphas_cumprod = ms.alphas_cumprod.clone()
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = ms.alphas_cumprod[0]
    if isinstance(scheduler, diffusers.UniPCMultistepScheduler):
        scheduler.sigmas = torch.cat([ms.sigmas[scheduler.timesteps], torch.zeros(1, dtype=torch.float64)])


@pytest.fixture
def float32_step_noise(monkeypatch):
    """diffusers draws step noise in the sample's dtype; draw it in float32 as the pipeline (float32
    latents) and our samplers do, so float64 runs see the same numbers."""
    def randn32(shape, generator=None, device=None, dtype=None, **kw):
        return randn_tensor(shape, generator=generator, dtype=torch.float32).to(dtype)
    for module in (scheduling_ddpm, scheduling_lcm):
        monkeypatch.setattr(module, "randn_tensor", randn32)


def generators(seed: int = 0, batch: int = 2) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(batch)]


def initial_noise(gens: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(4, 8, 8, generator=g) for g in gens]).double()


def run_reference(scheduler, model, gens: list[torch.Generator]) -> torch.Tensor:
    """diffusers' stepping loop from unit-variance noise, step noise from the per-image generators."""
    x = initial_noise(gens) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), int(t))
        kwargs = {"generator": gens} if isinstance(scheduler, (diffusers.DDPMScheduler, diffusers.LCMScheduler)) else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def run_ours(name: str, sigmas: torch.Tensor, denoiser=exact_denoiser) -> torch.Tensor:
    """Our sampler from the same noise, returned as the VP sample at the last sigma (as the pipeline does)."""
    spec = find_sampler(name)[0]
    gens = generators()
    x = initial_noise(gens) * spec.initial_noise_scale(float(sigmas[0]))
    inputs = {"model_schedule": ModelSchedule()} if "model_schedule" in spec.inputs else {}
    x = spec.fn(denoiser, x, sigmas, generator=gens, **inputs)
    return x / math.sqrt(1 + float(sigmas[-1]) ** 2)


def vp_model(ms: ModelSchedule, prediction: str = "epsilon"):
    """The exact denoiser as a diffusers model: (x_vp, t) -> eps or v."""
    def model(x_vp: torch.Tensor, t: int) -> torch.Tensor:
        sigma = float(ms.sigmas[t])
        x = x_vp * math.sqrt(1 + sigma**2)
        eps = (x - exact_denoiser(x, sigma)) / sigma
        if prediction == "epsilon":
            return eps
        a = float(ms.alphas_cumprod[t])  # v = sqrt(a) eps - sqrt(1 - a) x0
        return math.sqrt(a) * eps - math.sqrt(1 - a) * exact_denoiser(x, sigma)
    return model


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


# --- (a) the analytic denoiser ------------------------------------------------------------------------


# PLMS at 1 step is left out: diffusers' PNDM then makes a plain DDIM step, CompVis (and ours) a Heun step.
@pytest.mark.parametrize("name, steps", [("plms", 10), ("plms", 4), ("ddpm", 10), ("unipc", 10), ("unipc", 3),
                                         ("lcm", 4), ("lcm", 8)])
def test_matches_diffusers_on_the_exact_denoiser(float32_step_noise, name, steps):
    ms = ModelSchedule()
    scheduler = make_scheduler(name)
    scheduler.set_timesteps(steps)
    float64_reference(scheduler, ms)
    ref = run_reference(scheduler, vp_model(ms), generators())
    err = rel_err(run_ours(name, diffusers_sigmas(name, scheduler, ms)), ref)
    print(f"\n[timestep samplers] {name} {steps} steps vs diffusers, exact denoiser: {err:.1e} relative")
    assert err < 1e-6


@pytest.mark.parametrize("order", [1, 3])
def test_unipc_other_orders_match_diffusers(order):
    """The sampler's `order` (not a user option yet) against diffusers' solver_order."""
    ms = ModelSchedule()
    scheduler = diffusers.UniPCMultistepScheduler.from_config({**SD, "solver_order": order})
    scheduler.set_timesteps(10)
    float64_reference(scheduler, ms)
    ref = run_reference(scheduler, vp_model(ms), generators())
    sigmas = diffusers_sigmas("unipc", scheduler, ms)
    x = initial_noise(generators()) * math.sqrt(1 + float(sigmas[0]) ** 2)
    assert rel_err(find_sampler("unipc")[0].fn(exact_denoiser, x, sigmas, order=order), ref) < 1e-10


def compvis_plms(model, ms: ModelSchedule, steps: int, x: torch.Tensor) -> torch.Tensor:
    """CompVis PLMSSampler.plms_sampling / p_sample_plms (ldm/models/diffusion/plms.py), eta 0, transcribed
    in its own VP terms; `model(x, t)` returns eps (for v models converted per call, as the web UI does)."""
    ac = ms.alphas_cumprod
    ddim_t = list(range(0, 1000, 1000 // steps))
    ddim_t = [t + 1 for t in ddim_t]  # make_ddim_timesteps("uniform") with its +1
    alphas, alphas_prev = ac[ddim_t], torch.cat([ac[:1], ac[ddim_t[:-1]]])
    time_range = ddim_t[::-1]
    old_eps = []

    def x_prev_and_pred_x0(x, e_t, index):
        a_t, a_prev = float(alphas[index]), float(alphas_prev[index])
        pred_x0 = (x - math.sqrt(1 - a_t) * e_t) / math.sqrt(a_t)
        return math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev) * e_t, pred_x0

    for i, t in enumerate(time_range):
        index = len(time_range) - i - 1
        t_next = time_range[min(i + 1, len(time_range) - 1)]
        e_t = model(x, t)
        if len(old_eps) == 0:
            x_prev, _ = x_prev_and_pred_x0(x, e_t, index)
            e_t_prime = (e_t + model(x_prev, t_next)) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, _ = x_prev_and_pred_x0(x, e_t_prime, index)
        old_eps = (old_eps + [e_t])[-3:]
    return x


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_plms_matches_compvis_and_diffusers_only_for_eps(prediction):
    """CompVis (and the web UI) combine eps; diffusers' PNDM combines the raw outputs, which for v differs."""
    ms = ModelSchedule()
    model = vp_model(ms, prediction)
    as_eps = model if prediction == "epsilon" else lambda x, t: (
        math.sqrt(float(ms.alphas_cumprod[t])) * model(x, t) + math.sqrt(1 - float(ms.alphas_cumprod[t])) * x)
    sigmas = make_sigmas(ms, "ddim", 8)
    ours = run_ours("plms", sigmas)
    assert rel_err(ours, compvis_plms(as_eps, ms, 8, initial_noise(generators()))) < 1e-10
    scheduler = make_scheduler("plms", prediction)
    scheduler.set_timesteps(8)
    float64_reference(scheduler, ms)
    err = rel_err(ours, run_reference(scheduler, model, generators()))
    assert err < 1e-10 if prediction == "epsilon" else err > 1e-3


@pytest.mark.parametrize("name", ["plms", "ddpm", "unipc", "lcm"])
@pytest.mark.parametrize("steps", [1, 4, 8, 10, 25, 30, 50])
def test_automatic_schedule_is_diffusers_timesteps(name, steps):
    """What "automatic" walks (through the pipeline's sampler_sigmas) equals the scheduler's timesteps."""
    if name == "plms" and 1000 % steps:
        pytest.skip("PLMS keeps CompVis's DDIM timesteps range(0, 1000, 1000 // steps) + 1: 30 steps -> 31")
    if name == "lcm" and "lcm" not in SCHEDULES:
        pytest.skip("schedule 'lcm' (LCMScheduler's timesteps) is not in schedule.py yet")
    ms = ModelSchedule()
    scheduler = make_scheduler(name)
    scheduler.set_timesteps(steps)
    params = stablekit.GenerationParams(sampler=name, steps=steps).validated()
    torch.testing.assert_close(sampler_sigmas(ms, params), diffusers_sigmas(name, scheduler, ms), rtol=1e-12, atol=0)


def test_samplers_are_registered_with_vp_start():
    for name, display in [("plms", "PLMS"), ("ddpm", "DDPM"), ("unipc", "UniPC"), ("lcm", "LCM")]:
        spec = find_sampler(name)[0]
        assert spec.name == display and spec.vp_start  # diffusers: init_noise_sigma = 1
    assert find_sampler("lcm")[0].inputs == ("model_schedule",)


def test_unipc_converges_at_third_order():
    """UniPC-2 with the corrector is third-order accurate (Zhao et al. 2023, thm. 3.1) on the ODE."""
    noise = initial_noise(generators(batch=1))
    errors = []
    for steps in (20, 40, 80):
        sigmas = make_sigmas(ModelSchedule(), "karras", steps)[:-1]  # stop at sigma_min: no final jump
        x = noise * float(sigmas[0])
        out = find_sampler("unipc")[0].fn(exact_denoiser, x.clone(), sigmas)
        ratio = math.sqrt(S**2 + float(sigmas[-1]) ** 2) / math.sqrt(S**2 + float(sigmas[0]) ** 2)
        errors.append((out - (MU + (x - MU) * ratio)).abs().max().item())
    rates = [math.log2(a / b) for a, b in itertools.pairwise(errors)]
    assert all(r > 2.5 for r in rates), (errors, rates)


# --- (b) end to end on the tiny models --------------------------------------------------------------


def test_txt2img_plms(pair):
    """PLMS vs diffusers' PNDM for the eps model; for the v model, where diffusers' PNDM is another method,
    vs CompVis's algorithm over diffusers' UNet with v -> eps per call, as the web UI runs it."""
    tiny, engine, pipe = pair
    ours = _ours(engine, sampler="PLMS", steps=4, cfg_scale=7.0, seed=21, batch_size=2)
    if tiny.config.prediction == "eps":
        scheduler = diffusers.PNDMScheduler.from_pretrained(tiny.diffusers_dir, subfolder="scheduler", skip_prk_steps=True)
        assert_close_pictures(ours, _diffusers(pipe, scheduler, [21, 22], 4, 7.0), f"{tiny.name} PLMS vs diffusers PNDM")
        return
    cond = reference_embeddings(pipe, [PROMPT] * 2)
    uncond = reference_embeddings(pipe, [NEGATIVE] * 2)
    ac = pipe.scheduler.alphas_cumprod.double()

    def eps_model(x, t):  # CFG on v, then v -> eps (the web UI's CompVisTimestepsVDenoiser)
        out = pipe.unet(torch.cat([x, x]).float(), t, encoder_hidden_states=torch.cat([cond, uncond])).sample
        c, u = out.double().chunk(2)
        return ac[t].sqrt() * (u + (c - u) * 7.0) + (1 - ac[t]).sqrt() * x

    x_t = torch.cat([torch.randn((1, 4, H // 8, W // 8), generator=g) for g in generators(21)]).double()
    with torch.no_grad():
        latents = compvis_plms(eps_model, ModelSchedule(), 4, x_t)
        ref = (pipe.vae.decode(latents.float() / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert_close_pictures(ours, ref, f"{tiny.name} PLMS vs CompVis PLMS")


@pytest.mark.parametrize("name, cls, scheduler, steps", [
    ("DDPM", "DDPMScheduler", "automatic", 4),
    ("UniPC", "UniPCMultistepScheduler", "automatic", 4),
    # 5 divides LCM's 50 distillation steps, where its timesteps are exactly "trailing" (asserted below).
    ("LCM", "LCMScheduler", "trailing", 5),
])
def test_txt2img_matches_diffusers(pair, name, cls, scheduler, steps):
    tiny, engine, pipe = pair
    # the folder's own config (an SD DDIMScheduler config: leading spacing, steps_offset 1), not pipe.scheduler's,
    # which the previous test replaced
    reference = getattr(diffusers, cls).from_pretrained(tiny.diffusers_dir, subfolder="scheduler")
    if name == "LCM":
        reference.set_timesteps(steps)
        torch.testing.assert_close(make_sigmas(ModelSchedule(), "trailing", steps),
                                   diffusers_sigmas("lcm", reference, ModelSchedule()), rtol=1e-12, atol=0)
    ref = _diffusers(pipe, reference, [31, 32], steps, 6.0)
    ours = _ours(engine, sampler=name, scheduler=scheduler, steps=steps, cfg_scale=6.0, seed=31, batch_size=2)
    assert_close_pictures(ours, ref, f"{tiny.name} {name} ({scheduler}) vs diffusers {cls}")
