"""GenerationParams: the one parameter schema shared by the CLI, the Python API and HTTP.

Each field is declared once, with its help text, its command-line flags and where it sits in a
web-UI API request (`Setting`); the CLI and the HTTP mapping are derived from these declarations,
and a test checks that every field is reachable from both under the web UI's name where it has one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping

from .diffusion.samplers import SamplerSpec, find_sampler
from .diffusion.schedule_names import SCHEDULE_LABELS, resolve_schedule

RESIZE_MODES = ("just-resize", "crop-and-resize", "resize-and-fill")  # the web UI's resize modes 0, 1, 2
MASKED_CONTENT = ("fill", "original", "latent-noise", "latent-nothing")  # the web UI's inpainting_fill 0..3

INPAINT_METHODS = ("auto", "blend", "model")
INPAINT_AREAS = ("whole", "masked")
EMPHASIS_MODES = ("original", "no-norm", "ignore", "none")  # the web UI's "Original", "No norm", "Ignore", "None"
# Hires-fix upscalers: our name -> the web UI's. Latent ones interpolate the latent; the others decode,
# resize the picture and encode again ("x4": the SD x4 upscaler, given with the engine's upscaler model).
HIRES_UPSCALERS = {
    "latent": "Latent", "latent-antialiased": "Latent (antialiased)", "latent-bicubic": "Latent (bicubic)",
    "latent-bicubic-antialiased": "Latent (bicubic antialiased)", "latent-nearest": "Latent (nearest)",
    "latent-nearest-exact": "Latent (nearest-exact)", "lanczos": "Lanczos", "nearest": "Nearest", "none": "None",
    "x4": "SD x4",
}

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Api:
    """Where a field sits in a web-UI API request.

    key: the request field (or, with where="override", the `override_settings` key) holding it;
    own: stablekit's own name, for a field the web UI has no counterpart of; values: the web UI's
    value -> ours, for its numbered or boolean enumerations.
    """

    key: str
    where: str = "body"  # body | override
    own: bool = False
    values: Mapping[Any, Any] | None = None


@dataclass(frozen=True)
class Setting:
    """A field's declaration: help, command-line flags (default --field-name) and API place.

    api None: deliberately not reachable over HTTP (it names files on the server's disk).
    parse: reads one command-line value; repeat: the flag may be given several times (a tuple).
    """

    help: str
    api: Api | None
    flags: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    type: type | None = None  # for fields whose default is None
    parse: Callable[[str], Any] | None = None
    repeat: bool = False
    metavar: str | None = None  # how --help shows the value


def lora_arg(text: str) -> tuple[str, float]:
    """FILE[:WEIGHT] -> (file, weight); the weight defaults to 1, as a <lora:name> tag's."""
    path, sep, weight = text.rpartition(":")
    if not sep or not weight.replace(".", "", 1).lstrip("-").isdigit():
        return text, 1.0
    return path, float(weight)


def size_arg(text: str) -> tuple[int, int]:
    """"WxH" -> (width, height); a side may be 0 where the field allows it."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.strip().isdigit() or not h.strip().isdigit():
        raise ValueError(f"a size is WIDTHxHEIGHT, e.g. 768x512; got {text!r}")
    return int(w), int(h)


def _sampler_and_schedule(sampler: str, scheduler: str) -> tuple[SamplerSpec, str]:
    """A sampler name (which may carry a schedule: "DPM++ 2M Karras") and a schedule name -> the sampler
    and the schedule, checked against the schedules the sampler walks."""
    spec, named_schedule = find_sampler(sampler)
    schedule = resolve_schedule(scheduler)
    if named_schedule and schedule == "automatic":
        schedule = named_schedule
    concrete = spec.default_schedule if schedule == "automatic" else schedule
    if spec.schedules is not None and concrete not in spec.schedules:
        raise ValueError(f"sampler '{spec.name}' walks only the schedules {', '.join(spec.schedules)}; got '{schedule}'")
    return spec, schedule


def _size(value: Any, what: str) -> tuple[int, int] | None:
    """A size field's value: None, "WxH", or two whole numbers."""
    if value is None:
        return None
    if isinstance(value, str):
        return size_arg(value)
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{what} must be WxH (two whole numbers), got {value!r}")
    return tuple(value)


def find_upscaler(name: str) -> str:
    """Our name or the web UI's label (any case) -> our name."""
    for ours, label in HIRES_UPSCALERS.items():
        if name.lower() in (ours, label.lower()):
            return ours
    raise ValueError(f"unknown hires upscaler '{name}'; choose from {', '.join(HIRES_UPSCALERS)}")


def _f(default: Any, help: str, api: Api, **kw: Any) -> Any:
    return field(default=default, metadata={"setting": Setting(help, api, **kw)})


@dataclass(frozen=True)
class GenerationParams:
    prompt: str = _f("", "what to draw", Api("prompt"), flags=("--prompt", "-p"))
    negative_prompt: str = _f("", "what to steer away from", Api("negative_prompt"),
                              flags=("--negative-prompt", "-n"))
    steps: int = _f(20, "sampling steps", Api("steps"))
    cfg_scale: float = _f(7.0, "classifier-free guidance scale", Api("cfg_scale"))
    sampler: str = _f("DPM++ 2M", 'e.g. "DPM++ 2M", "Euler a", ddim (see: stablekit samplers)', Api("sampler_name"))
    scheduler: str = _f("automatic", "automatic, karras, ... (see: stablekit samplers)", Api("scheduler"))
    seed: int = _f(-1, "-1 = random; image i uses seed + i", Api("seed"))
    # None: the model's own resolution (512 for SD 1.x), filled in by the Engine
    width: int | None = _f(None, "multiple of 8", Api("width"), type=int)
    height: int | None = _f(None, "multiple of 8", Api("height"), type=int)
    batch_size: int = _f(1, "pictures per run", Api("batch_size"))
    clip_skip: int = _f(1, "text-encoder layers to skip from the end (1 = none, the web UI's numbering)",
                        Api("CLIP_stop_at_last_layers", where="override"))
    eta: float | None = _f(None, "noise of ancestral samplers and DDIM (default: the sampler's)", Api("eta"),
                           type=float)
    s_noise: float = _f(1.0, "noise multiplier of ancestral/SDE samplers", Api("s_noise"))
    emphasis: str = _f("original", "how (word:1.2) weights apply: original (the web UI's default), no-norm, ignore, "
                       "none (brackets are literal)", Api("emphasis", where="override", values={
                           "Original": "original", "No norm": "no-norm", "Ignore": "ignore", "None": "none"}),
                       choices=EMPHASIS_MODES)
    loras: tuple[tuple[str, float], ...] = _f((), "a LoRA / LyCORIS file to apply, weight 1 unless given (repeatable); "
                                              "prompts can also say <lora:NAME:WEIGHT>", None, flags=("--lora",),
                                              parse=lora_arg, repeat=True, metavar="FILE[:WEIGHT]")
    guidance_rescale: float = _f(0.0, "CFG rescale phi (Lin et al. 2023), 0..1; 0.7 suits zero-terminal-SNR v-models",
                                 Api("guidance_rescale", own=True))  # diffusers' name; the web UI core has none
    # variation seeds (the web UI's): the seed's noise moved toward another seed's, and noise made at another size
    subseed: int = _f(-1, "variation seed (-1 = random); image i uses subseed + i", Api("subseed"))
    subseed_strength: float = _f(0.0, "0..1: how far the noise moves from the seed's toward the variation seed's "
                                 "(all images then share the seed)", Api("subseed_strength"))
    seed_resize_from: tuple[int, int] | None = _f(
        None, "WxH: draw the seed's noise as for a picture of this size, placed in the middle, so a seed keeps its "
        "composition at another size", Api("seed_resize_from_w"), parse=size_arg, metavar="WxH")
    # hires fix (txt2img): a second img2img pass at a larger size
    hires_scale: float | None = _f(None, "hires fix: upscale the first pass by this factor and refine it",
                                   Api("hr_scale"), type=float)
    hires_resize: tuple[int, int] | None = _f(None, "hires fix to this WxH instead (0 for a side keeps the aspect)",
                                              Api("hr_resize_x"), parse=size_arg, metavar="WxH")
    hires_upscaler: str = _f("latent", "how the first pass is enlarged", Api("hr_upscaler"),
                             choices=tuple(HIRES_UPSCALERS))
    hires_steps: int = _f(0, "steps of the second pass (0 = --steps)", Api("hr_second_pass_steps"))
    hires_denoise: float = _f(0.7, "denoising strength of the second pass", Api("denoising_strength"))
    hires_sampler: str | None = _f(None, "sampler of the second pass (default: --sampler)", Api("hr_sampler_name"),
                                   type=str)
    hires_scheduler: str | None = _f(None, "schedule of the second pass (default: --scheduler)",
                                     Api("hr_scheduler"), type=str)
    hires_prompt: str = _f("", "prompt of the second pass (default: --prompt)", Api("hr_prompt"))
    hires_negative_prompt: str = _f("", "negative prompt of the second pass (default: --negative-prompt)",
                                    Api("hr_negative_prompt"))
    # the SD x4 upscaler
    noise_level: int = _f(20, "noise added to the low-resolution picture, 0..350 (more: more invented detail)",
                          Api("noise_level", own=True))
    upscale_tile: int = _f(0, "upscale in overlapping tiles of this many input pixels (0: whole), bounding memory",
                           Api("upscale_tile", own=True), flags=("--tile",))
    # img2img
    denoising_strength: float = _f(0.75, "0 keeps the picture, 1 repaints it entirely", Api("denoising_strength"),
                                   flags=("--strength", "--denoising-strength"))
    resize_mode: str = _f("just-resize", "how a picture of another size is fitted to --width/--height",
                          Api("resize_mode", values=dict(enumerate(RESIZE_MODES))), choices=RESIZE_MODES)
    # inpainting
    mask_blur: float = _f(4.0, "soft edge of the mask, Gaussian sigma in pixels", Api("mask_blur"))
    invert_mask: bool = _f(False, "repaint the black part instead", Api("inpainting_mask_invert",
                                                                         values={0: False, 1: True}))
    inpaint_method: str = _f("auto", "blend (any model), model (9-channel inpainting checkpoints), auto",
                             Api("inpainting_method", own=True), flags=("--method",), choices=INPAINT_METHODS)
    masked_content: str = _f("original", "what the masked region starts as",
                             Api("inpainting_fill", values=dict(enumerate(MASKED_CONTENT))), choices=MASKED_CONTENT)
    mask_strength: float = _f(1.0, "inpainting models: how much of the masked picture is hidden from the model",
                              Api("inpainting_mask_weight", where="override"))
    paste_back: bool = _f(True, "paste the input's pixels back outside the mask (--no-paste-back keeps the generated "
                          "ones)", Api("paste_back", own=True), flags=("--no-paste-back",))
    inpaint_area: str = _f("whole", "masked: generate a box around the mask at full --width x --height and put it back",
                           Api("inpaint_full_res", values={False: "whole", True: "masked"}), choices=INPAINT_AREAS)
    inpaint_padding: int = _f(32, "pixels around the mask's box for --inpaint-area masked",
                              Api("inpaint_full_res_padding"), flags=("--padding",))
    soft_inpainting: bool = _f(False, "use the greyscale mask as per-pixel denoising strength",
                               Api("soft_inpainting", own=True), flags=("--soft",))

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
        if self.inpaint_area not in INPAINT_AREAS:
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
        if self.emphasis not in EMPHASIS_MODES:
            raise ValueError(f"unknown emphasis '{self.emphasis}'; choose from {', '.join(EMPHASIS_MODES)}")
        loras = tuple((str(path), float(weight)) for path, weight in self.loras)
        if not -1 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be -1 (random) or between 0 and {MAX_SEED}, got {self.seed}")
        if not isinstance(self.noise_level, int) or not 0 <= self.noise_level <= 350:
            raise ValueError(f"noise level must be a whole number from 0 to 350 (the upscaler's max_noise_level), "
                             f"got {self.noise_level}")
        if not isinstance(self.upscale_tile, int) or not (self.upscale_tile == 0 or 16 <= self.upscale_tile <= 4096):
            raise ValueError(f"tile must be 0 (no tiling) or from 16 to 4096 pixels, got {self.upscale_tile}")
        variation = self._validated_variation()
        hires = self._validated_hires()
        spec, schedule = _sampler_and_schedule(self.sampler, self.scheduler)
        if self.eta is not None and "eta" not in spec.options:
            raise ValueError(f"sampler '{spec.name}' takes no eta")
        seed = random.randrange(MAX_SEED - self.batch_size) if self.seed == -1 else self.seed
        if seed + self.batch_size - 1 > MAX_SEED:
            raise ValueError(f"seed {seed} + batch size {self.batch_size} goes past {MAX_SEED}")
        return replace(self, sampler=spec.name, scheduler=schedule, seed=seed, loras=loras, **variation, **hires)

    def _validated_variation(self) -> dict[str, Any]:
        if not isinstance(self.subseed, int) or not -1 <= self.subseed <= MAX_SEED:
            raise ValueError(f"subseed must be -1 (random) or between 0 and {MAX_SEED}, got {self.subseed}")
        if not 0 <= self.subseed_strength <= 1:
            raise ValueError(f"subseed strength must be between 0 and 1, got {self.subseed_strength}")
        resize = _size(self.seed_resize_from, "seed resize from")
        if resize is not None:
            if min(resize) < 8 or max(resize) > 8192:
                raise ValueError(f"seed resize from must be WxH with sides from 8 to 8192, got {self.seed_resize_from}")
        subseed = random.randrange(MAX_SEED - self.batch_size) if self.subseed == -1 else self.subseed
        if subseed + self.batch_size - 1 > MAX_SEED:
            raise ValueError(f"subseed {subseed} + batch size {self.batch_size} goes past {MAX_SEED}")
        return {"subseed": subseed, "seed_resize_from": resize}

    def _validated_hires(self) -> dict[str, Any]:
        if self.hires_scale is not None and not 1 <= self.hires_scale <= 8:
            raise ValueError(f"hires scale must be between 1 and 8, got {self.hires_scale}")
        resize = _size(self.hires_resize, "hires resize")
        if resize is not None:
            if min(resize) < 0 or max(resize) > 8192 or max(resize) == 0:
                raise ValueError(f"hires resize must be WxH up to 8192 with at least one side set, got {resize}")
        if not isinstance(self.hires_steps, int) or not 0 <= self.hires_steps <= 1000:
            raise ValueError(f"hires steps must be a whole number from 0 to 1000, got {self.hires_steps}")
        if not 0 <= self.hires_denoise <= 1:
            raise ValueError(f"hires denoising strength must be between 0 and 1, got {self.hires_denoise}")
        sampler, scheduler = self.hires_sampler, self.hires_scheduler
        if sampler or scheduler:  # as the first pass's: a name's own schedule ("Euler Karras") counts
            spec, schedule = _sampler_and_schedule(sampler or self.sampler, scheduler or self.scheduler)
            sampler, scheduler = spec.name if sampler else None, schedule
        return {"hires_resize": resize, "hires_upscaler": find_upscaler(self.hires_upscaler or "latent"),
                "hires_sampler": sampler, "hires_scheduler": scheduler}

    @property
    def hires(self) -> bool:
        """Whether txt2img runs a hires-fix second pass."""
        return self.hires_scale is not None or self.hires_resize is not None

    @property
    def image_seeds(self) -> list[int]:
        """Each image's seed: seed + i, or the seed itself for all when a variation strength is set (the
        web UI's rule: the variation seeds then tell the images apart)."""
        return [self.seed + (0 if self.subseed_strength else i) for i in range(self.batch_size)]

    @property
    def image_subseeds(self) -> list[int]:
        return [self.subseed + i for i in range(self.batch_size)]

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


def settings() -> dict[str, Setting]:
    """Every field's declaration, by field name, in declaration order."""
    return {f.name: f.metadata["setting"] for f in fields(GenerationParams)}
