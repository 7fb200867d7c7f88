"""The sampler registry: display names and aliases as the popular web UIs show them."""

from __future__ import annotations

from . import k_samplers, timestep_samplers
from .common import Callback, SamplerSpec
from .schedule import SCHEDULE_LABELS, canonical

__all__ = ["SAMPLERS", "Callback", "SamplerSpec", "find_sampler"]

SAMPLERS: tuple[SamplerSpec, ...] = k_samplers.SPECS + timestep_samplers.SPECS


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
