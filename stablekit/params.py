"""GenerationParams: the one parameter schema shared by the CLI, the Python API and (later) HTTP."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from .diffusion.samplers import SamplerSpec, find_sampler
from .diffusion.schedule import SCHEDULE_LABELS, resolve_schedule
from .images import RESIZE_MODES
from .masks import MASKED_CONTENT

INPAINT_METHODS = ("auto", "blend", "model")

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class GenerationParams:
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "DPM++ 2M"
    scheduler: str = "automatic"
    seed: int = -1  # -1: random
    width: int | None = None  # None: the model's own resolution (512 for SD 1.x), filled in by the Engine
    height: int | None = None
    batch_size: int = 1
    clip_skip: int = 1  # A1111 numbering: 1 = last layer
    eta: float | None = None  # ancestral/DDIM noise; None = the sampler's default
    s_noise: float = 1.0  # noise multiplier of ancestral and SDE samplers
    guidance_rescale: float = 0.0  # phi of Lin et al. 2023 (diffusers' guidance_rescale); 0 = off
    denoising_strength: float = 0.75  # img2img: how much of the schedule runs (0 keeps the picture)
    resize_mode: str = "just-resize"  # img2img: how a picture of another size is fitted
    # inpainting (web-UI names: mask_blur, inpainting_fill, inpainting_mask_weight)
    mask_blur: float = 4.0  # Gaussian sigma in pixels of the mask's soft edge
    invert_mask: bool = False
    inpaint_method: str = "auto"  # blend (any model), model (9-channel inpainting model), auto
    masked_content: str = "original"  # fill, original, latent-noise, latent-nothing
    mask_strength: float = 1.0  # 9-channel models: how much of the masked picture is hidden from the model
    paste_back: bool = True  # outside the mask, the output's pixels are the input's
    inpaint_area: str = "whole"  # whole picture, or "masked": a box around the mask at full resolution
    inpaint_padding: int = 32  # pixels around the mask's box for "masked"
    soft_inpainting: bool = False  # the (greyscale) mask is a per-pixel denoising strength

    def validated(self) -> GenerationParams:
        """Check every field; returns a copy with names canonicalised and a concrete seed."""
        for name in ("width", "height", "steps", "batch_size", "clip_skip", "seed"):
            v = getattr(self, name)
            if v is None and name in ("width", "height"):
                continue  # left to the engine: the model's resolution
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name} must be a whole number, got {v!r}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is None:
                continue
            if v < 8 or v % 8:
                raise ValueError(f"{name} must be a positive multiple of 8 (the latent is 1/8 of the picture), got {v}")
            if v > 8192:
                raise ValueError(f"{name} {v} is too large (at most 8192)")
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be between 1 and 1000, got {self.steps}")
        if not 0 <= self.cfg_scale <= 100:
            raise ValueError(f"cfg scale must be between 0 and 100, got {self.cfg_scale}")
        if not 1 <= self.batch_size <= 64:
            raise ValueError(f"batch size must be between 1 and 64, got {self.batch_size}")
        if self.clip_skip < 1:
            raise ValueError(f"clip skip must be at least 1, got {self.clip_skip}")
        if not 0 <= self.denoising_strength <= 1:
            raise ValueError(f"denoising strength must be between 0 and 1, got {self.denoising_strength}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode '{self.resize_mode}'; choose from {', '.join(RESIZE_MODES)}")
        if not 0 <= self.mask_blur <= 256:
            raise ValueError(f"mask blur must be between 0 and 256 pixels, got {self.mask_blur}")
        if self.inpaint_method not in INPAINT_METHODS:
            raise ValueError(f"unknown inpainting method '{self.inpaint_method}'; choose from {', '.join(INPAINT_METHODS)}")
        if self.masked_content not in MASKED_CONTENT:
            raise ValueError(f"unknown masked content '{self.masked_content}'; choose from {', '.join(MASKED_CONTENT)}")
        if self.inpaint_area not in ("whole", "masked"):
            raise ValueError(f"unknown inpaint area '{self.inpaint_area}'; choose whole or masked")
        if not isinstance(self.inpaint_padding, int) or not 0 <= self.inpaint_padding <= 4096:
            raise ValueError(f"padding must be a whole number of pixels from 0 to 4096, got {self.inpaint_padding}")
        if not 0 <= self.mask_strength <= 1:
            raise ValueError(f"mask strength must be between 0 and 1, got {self.mask_strength}")
        if not 0 <= self.guidance_rescale <= 1:
            raise ValueError(f"guidance rescale must be between 0 and 1, got {self.guidance_rescale}")
        if not 0 <= self.s_noise <= 10:
            raise ValueError(f"s_noise must be between 0 and 10, got {self.s_noise}")
        if self.eta is not None and not 0 <= self.eta <= 10:
            raise ValueError(f"eta must be between 0 and 10, got {self.eta}")
        if not -1 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be -1 (random) or between 0 and {MAX_SEED}, got {self.seed}")
        spec, named_schedule = find_sampler(self.sampler)
        schedule = resolve_schedule(self.scheduler)
        if named_schedule and schedule == "automatic":
            schedule = named_schedule
        concrete = spec.default_schedule if schedule == "automatic" else schedule
        if spec.schedules is not None and concrete not in spec.schedules:
            raise ValueError(f"sampler '{spec.name}' walks only the schedules {', '.join(spec.schedules)}; "
                             f"got '{schedule}'")
        if self.eta is not None and "eta" not in spec.options:
            raise ValueError(f"sampler '{spec.name}' takes no eta")
        seed = random.randrange(MAX_SEED - self.batch_size) if self.seed == -1 else self.seed
        if seed + self.batch_size - 1 > MAX_SEED:
            raise ValueError(f"seed {seed} + batch size {self.batch_size} goes past {MAX_SEED}")
        return replace(self, sampler=spec.name, scheduler=schedule, seed=seed)

    @property
    def sampler_spec(self) -> SamplerSpec:
        return find_sampler(self.sampler)[0]

    @property
    def schedule_name(self) -> str:
        """The concrete schedule: "automatic" resolved to the sampler's usual default."""
        return self.sampler_spec.default_schedule if self.scheduler == "automatic" else self.scheduler

    @property
    def schedule_label(self) -> str:
        return SCHEDULE_LABELS[self.schedule_name]

    def eta_infotext(self) -> dict[str, float]:
        """The web UI writes eta only when it differs from the sampler's default, as "Eta DDIM" for DDIM."""
        spec = self.sampler_spec
        if self.eta is None or "eta" not in spec.options:
            return {}
        default = 0.0 if spec.name == "DDIM" else 1.0
        if self.eta == default:
            return {}
        return {"Eta DDIM" if spec.name == "DDIM" else "Eta": self.eta}

    def sampler_options(self) -> dict[str, float]:
        options = {}
        if "eta" in self.sampler_spec.options and self.eta is not None:
            options["eta"] = self.eta
        if "s_noise" in self.sampler_spec.options:
            options["s_noise"] = self.s_noise
        return options
