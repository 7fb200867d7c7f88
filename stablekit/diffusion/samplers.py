"""The sampler registry: display names and aliases as the popular web UIs show them.

The table names each sampler's function ("k_samplers.sample_euler") instead of importing it, so
reading it (`stablekit samplers`, `--help`, checking a request) needs no torch; `SamplerSpec.fn`
imports the function when a sampler first runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Callable

from .schedule_names import SCHEDULE_LABELS, canonical

__all__ = ["SAMPLERS", "SamplerSpec", "find_sampler"]


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # display name, as the popular web UI shows it
    aliases: tuple[str, ...]
    function: str  # "module.function" in this package: the sampler (see diffusion/common.py)
    default_schedule: str  # what "automatic" means for this sampler
    # VP-native samplers (DDIM) start from unit-variance noise x_T, i.e. noise * sqrt(1 + sigma^2)
    # in sigma space; k-diffusion samplers start from noise * sigma.
    vp_start: bool = False
    options: tuple[str, ...] = field(default=())  # user options it accepts (eta, s_noise, ...)
    # What the pipeline must hand it besides the signature: "model_schedule" (the ModelSchedule, for
    # samplers that work on trained timesteps) and "seeds" (per-image seeds, for Brownian-tree noise).
    inputs: tuple[str, ...] = field(default=())
    # The web UI builds steps+1 sigmas and drops the next-to-last one for samplers whose last
    # step would otherwise be wasted (DPM2, DPM2 a, DPM++ 3M SDE).
    discard_penultimate_sigma: bool = False
    schedules: tuple[str, ...] | None = None  # the schedules it can walk; None = all of them
    # Two model calls per step: the web UI measures prompt-editing schedules in 2 x steps for these.
    second_order: bool = False

    @property
    def fn(self) -> Callable[..., Any]:
        module, name = self.function.rsplit(".", 1)
        return getattr(import_module(f"{__package__}.{module}"), name)

    def initial_noise_scale(self, sigma: float) -> float:
        return math.sqrt(1 + sigma**2) if self.vp_start else sigma


SAMPLERS: tuple[SamplerSpec, ...] = (
    # Names, aliases, "automatic" schedules and the discarded penultimate sigma as in the web UI (1.9+).
    SamplerSpec("Euler", ("euler", "k_euler"), "k_samplers.sample_euler", "uniform"),
    SamplerSpec("Euler a", ("euler_a", "euler_ancestral", "k_euler_a", "k_euler_ancestral"),
                "k_samplers.sample_euler_ancestral", "uniform", options=("eta", "s_noise")),
    SamplerSpec("DPM++ 2M", ("dpmpp_2m", "k_dpmpp_2m"), "k_samplers.sample_dpmpp_2m", "karras"),
    SamplerSpec("LMS", ("lms", "k_lms"), "k_samplers.sample_lms", "uniform"),
    SamplerSpec("Heun", ("heun", "k_heun"), "k_samplers.sample_heun", "uniform", second_order=True),
    SamplerSpec("DPM2", ("dpm_2", "k_dpm_2"), "k_samplers.sample_dpm_2", "karras", discard_penultimate_sigma=True,
                second_order=True),
    SamplerSpec("DPM2 a", ("dpm_2_a", "dpm_2_ancestral", "k_dpm_2_a"), "k_samplers.sample_dpm_2_ancestral", "karras",
                options=("eta", "s_noise"), discard_penultimate_sigma=True, second_order=True),
    SamplerSpec("DPM++ 2S a", ("dpmpp_2s_a", "dpmpp_2s_ancestral", "k_dpmpp_2s_a"),
                "k_samplers.sample_dpmpp_2s_ancestral", "karras", options=("eta", "s_noise"), second_order=True),
    SamplerSpec("DPM++ SDE", ("dpmpp_sde", "k_dpmpp_sde"), "k_samplers.sample_dpmpp_sde", "karras",
                options=("eta", "s_noise"), inputs=("seeds",), second_order=True),
    SamplerSpec("DPM++ 2M SDE", ("dpmpp_2m_sde", "k_dpmpp_2m_sde"), "k_samplers.sample_dpmpp_2m_sde", "exponential",
                options=("eta", "s_noise"), inputs=("seeds",)),
    SamplerSpec("DPM++ 3M SDE", ("dpmpp_3m_sde", "k_dpmpp_3m_sde"), "k_samplers.sample_dpmpp_3m_sde", "exponential",
                options=("eta", "s_noise"), inputs=("seeds",), discard_penultimate_sigma=True),
    SamplerSpec("DDIM", ("ddim",), "timestep_samplers.sample_ddim", "ddim", vp_start=True, options=("eta",)),
    SamplerSpec("PLMS", ("plms", "pndm"), "timestep_samplers.sample_plms", "ddim", vp_start=True),
    SamplerSpec("DDPM", ("ddpm",), "timestep_samplers.sample_ddpm", "leading", vp_start=True),
    # diffusers' multistep schedulers space steps+1 timesteps and drop the last: that is "leading"
    # of steps+1 less its penultimate sigma.
    SamplerSpec("UniPC", ("unipc", "uni_pc"), "timestep_samplers.sample_unipc", "leading", vp_start=True,
                discard_penultimate_sigma=True),
    SamplerSpec("LCM", ("lcm",), "timestep_samplers.sample_lcm", "lcm", vp_start=True, inputs=("model_schedule",)),
)


def find_sampler(name: str) -> tuple[SamplerSpec, str | None]:
    """Display name or alias -> (spec, schedule named in the sampler name, e.g. "DPM++ 2M Karras")."""
    key = canonical(name)
    for spec in SAMPLERS:
        if key in {canonical(spec.name), *spec.aliases}:
            return spec, None
    for spec in SAMPLERS:  # old web-UI names carry the schedule: "DPM++ 2M Karras"
        for label in SCHEDULE_LABELS:
            if key in {f"{a}_{label}" for a in (canonical(spec.name), *spec.aliases)}:
                return spec, label
    names = ", ".join(f"'{s.name}' ({'/'.join(s.aliases[:1])})" for s in SAMPLERS)
    raise ValueError(f"unknown sampler '{name}'; choose from {names}")
