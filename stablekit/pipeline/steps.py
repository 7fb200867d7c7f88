"""The shared steps every task composes: seed -> noise, the sampling plan, sampling, VAE encode/decode."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..diffusion.brownian import brownian_noise
from ..diffusion.common import Callback, SamplingStopped
from ..diffusion.denoiser import Denoise
from ..diffusion.samplers import SamplerSpec
from ..diffusion.schedule import ModelSchedule, make_sigmas
from ..models import StableDiffusionModel
from ..params import GenerationParams
from .seeds import first_noise


def generators_for(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: the same seed gives the same noise on every device."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def sampler_sigmas(schedule: ModelSchedule, p: GenerationParams) -> torch.Tensor:
    """The schedule the sampler walks: `steps` steps, or steps+1 less the next-to-last where the spec says."""
    if p.sampler_spec.discard_penultimate_sigma:
        sigmas = make_sigmas(schedule, p.schedule_name, p.steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return make_sigmas(schedule, p.schedule_name, p.steps)


def fixed_steps_sigmas(schedule: ModelSchedule, p: GenerationParams, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The web UI's img2img with fixed steps (hires fix): exactly `steps` steps run, on the tail of a
    schedule of int(steps / strength) steps (strength capped at 0.999). Returns (full, tail)."""
    total = max(p.steps, int(p.steps / min(strength, 0.999)))
    full = sampler_sigmas(schedule, replace(p, steps=total))
    return full, full[-(p.steps + 1):]


def cut_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of a schedule that a denoising strength runs: int(steps * strength) steps, at least one,
    as diffusers and the web UI cut it (strength 1: the whole schedule)."""
    run = max(1, int((len(sigmas) - 1) * strength))
    return sigmas[-(run + 1):]


@dataclass
class StepClock:
    """Where a pass's sampling is: what step-windowed conditioning (ControlNet start/end) reads.

    total: the steps this pass runs; reported: the last step the sampler reported done (None before
    the first), as the web UI's `state.sampling_step` follows its sampler's callback.
    """

    total: int
    reported: int | None = None


@dataclass(frozen=True)
class SamplingPlan:
    """One job's sampler, schedule, noise and randomness, made once before sampling.

    `full` is the schedule for all `steps` steps, `sigmas` the part that runs (cut by strength).
    """

    spec: SamplerSpec
    options: dict
    full: torch.Tensor
    sigmas: torch.Tensor
    noise: torch.Tensor  # [B, C, h, w] float32 on the device
    generators: list[torch.Generator]
    seeds: list[int]
    model_schedule: ModelSchedule
    clock: StepClock


def plan_sampling(
    schedule: ModelSchedule, p: GenerationParams, latent_shape: tuple[int, int, int], device: torch.device,
    noise: torch.Tensor | None = None, strength: float = 1.0, fixed_steps: bool = False,
    generators: list[torch.Generator] | None = None,
) -> SamplingPlan:
    """Per-image generators and noise (explicit `noise` replaces the seeded draw, which still happens so
    later random draws match), the schedule and its cut for `strength`: the last int(steps * strength)
    steps of `steps`, or with `fixed_steps` all `steps` on the tail of a longer schedule.

    `generators`: the images' generators where the task drew from them first (default: fresh ones).
    """
    seeds = p.image_seeds
    generators = generators or generators_for(seeds)
    downscale = p.width // latent_shape[-1] if p.width else 8  # picture pixels per latent cell
    seeded = first_noise(p, generators, latent_shape, downscale)
    if noise is not None:
        if tuple(noise.shape) != (p.batch_size, *latent_shape):
            raise ValueError(f"explicit noise has shape {tuple(noise.shape)}, expected {(p.batch_size, *latent_shape)}")
        seeded = noise.float()
    if fixed_steps:
        full, sigmas = fixed_steps_sigmas(schedule, p, strength)
    else:
        full = sampler_sigmas(schedule, p)
        sigmas = cut_sigmas(full, strength)
    return SamplingPlan(p.sampler_spec, p.sampler_options(), full, sigmas, seeded.to(device), generators, seeds,
                        schedule, StepClock(len(sigmas) - 1))


@torch.inference_mode()
def denoise(
    denoiser: Denoise,
    plan: SamplingPlan,
    *,
    start: torch.Tensor | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Run the plan's sampler over its sigmas from `start` (default zeros) noised to sigmas[0].

    Returns the variance-preserving latent at the last sigma (x / sqrt(1 + sigma^2)), which is
    the clean latent when the schedule ends at zero and DDIM's x at t=0 otherwise. A callback that
    raises SamplingStopped ends sampling there and the last x0 estimate is returned instead.
    """
    spec, sigmas, noise = plan.spec, plan.sigmas, plan.noise
    if start is None:
        x = noise * spec.initial_noise_scale(float(sigmas[0]))
    else:  # a picture's latent noised to sigmas[0]: x = x0 + sigma * noise for every sampler
        x = start + noise * float(sigmas[0])
    offered = {"model_schedule": plan.model_schedule, "seeds": plan.seeds}
    given = {name: offered[name] for name in spec.inputs}
    options = dict(plan.options)
    if "seeds" in spec.inputs and len(sigmas) < len(plan.full):
        # A run over the tail of the schedule (img2img): the web UI's Brownian tree still spans all of it.
        options["noise_sampler"] = brownian_noise(noise, plan.full, plan.seeds)
    last: list[torch.Tensor] = []
    plan.clock.reported = None

    def watch(i: int, n: int, x0: torch.Tensor) -> None:
        last[:] = [x0]  # kept first, so a callback that stops sampling leaves an estimate behind
        plan.clock.reported = i
        if callback is not None:
            callback(i, n, x0)

    try:
        x = spec.fn(denoiser, x, sigmas, generator=plan.generators, callback=watch, **options, **given)
    except SamplingStopped:
        if not last:
            raise
        return last[0].float()  # the clean-latent estimate of the step the callback stopped at
    return x / math.sqrt(1 + float(sigmas[-1]) ** 2)


@torch.inference_mode()
def encode_picture(model: StableDiffusionModel, pictures: torch.Tensor) -> torch.Tensor:
    """pictures [B, 3, H, W] in [0, 1] -> scaled latents [B, 4, H/8, W/8] float32.

    The latent distribution's mean is used, not a sample: deterministic, and the VAE's posterior
    is so narrow that a sample differs by about 1e-3.
    """
    vae = model.vae
    param = next(vae.parameters())
    mean, _ = vae.encode((pictures * 2 - 1).to(device=param.device, dtype=param.dtype))
    return (mean.float() - vae.cfg.shift_factor) * vae.cfg.scale_factor


@torch.inference_mode()
def decode(model: StableDiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """scaled latents [B, 4, h, w] -> pictures [B, 3, 8h, 8w] float32 in [0, 1]."""
    return vae_decode(model.vae, latents)


def vae_decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """`decode` with the VAE alone (a preview's small decoder travels without its model)."""
    dtype = next(vae.parameters()).dtype
    pictures = vae.decode((latents / vae.cfg.scale_factor + vae.cfg.shift_factor).to(dtype)).float()
    return ((pictures + 1) / 2).clamp(0, 1)
