"""Random weights of a real model's exact shapes, written once as an original-layout single file."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml

from ..config import PRESETS, ModelConfig
from ..models import StableDiffusionModel
from .diffusers_folder import ldm_yaml


def shapes_config(shapes: str) -> ModelConfig:
    """`sd1.5`: SD 1.5's exact shapes (what the timings are about); `demo`: the shipped demo model's, for seconds-long runs."""
    if shapes == "sd1.5":
        return PRESETS["sd1"]
    if shapes == "demo":
        from ..train.demo import DEMO_CONFIG

        return DEMO_CONFIG
    raise ValueError(f"unknown shapes '{shapes}'; choose sd1.5 or demo")


SHAPES = ("sd1.5", "demo")


@torch.no_grad()
def random_checkpoint(preset: str | ModelConfig, path: Path, seed: int = 0) -> Path:
    """Write random weights of `preset`'s exact shapes as a single-file checkpoint (cached).

    `preset` is a name in PRESETS (what detection finds from the weights alone) or any ModelConfig;
    for the latter a same-name `.yaml` (LDM config format) tells the loader what weights cannot,
    such as the GroupNorm groups of small models.
    """
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    if path.is_file():
        return path
    from safetensors.torch import save_file

    model = StableDiffusionModel(cfg)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
        else:  # fan-in scaled, so activations stay finite through the deep networks
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(preset, str):
        path.with_suffix(".yaml").write_text(yaml.safe_dump(ldm_yaml(cfg)))
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.rename(path)  # last, so a half-written file is never taken for a cached one
    return path


def checkpoint_for(shapes: str, cache: Path) -> Path:
    """The cached random checkpoint for `shapes` in `cache`."""
    preset: str | ModelConfig = "sd1" if shapes == "sd1.5" else shapes_config(shapes)
    return random_checkpoint(preset, cache / f"random-{shapes}-shapes.safetensors")
