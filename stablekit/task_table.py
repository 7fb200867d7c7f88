"""The task table: each task declared once, with its fields, inputs and the functions that run it.

A task is `prepare` (its pictures at the working size, and how results go back: a Canvas),
`sample` (the latent work, ending at latents) and its infotext fields; decoding, paste-back and
crop-back are the shared `editing.finish`. The Engine, the CLI, the server worker and the job
routes all dispatch through TASKS, so adding a task is one entry here plus its functions.

The table needs no torch: a function given by name is looked up in `pipeline.tasks` when the task
first runs, so the command line builds its subcommands and checks arguments without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Callable, Mapping

from .config import INPUT_KINDS, ModelConfig
from .params import GenerationParams

Inputs = Mapping[str, Any]
Ref = Callable[..., Any] | str  # a function, or the name of one in stablekit.pipeline.tasks


def resolved(ref: Ref) -> Callable[..., Any]:
    return ref if callable(ref) else getattr(import_module(".pipeline.tasks", __package__), ref)


@dataclass(frozen=True)
class TaskInput:
    """What a task takes besides GenerationParams: a picture, a mask, or an option of its own.

    kind: picture (RGB), mask (kept as given: an RGBA mask's alpha counts), int, flag or choice.
    """

    name: str
    kind: str
    help: str
    flags: tuple[str, ...] = ()  # command line (default --name)
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Task:
    name: str
    help: str
    fields: tuple[str, ...]  # the GenerationParams fields it reads (the others are ignored)
    prepare_fn: Ref  # (ctx, p, inputs) -> Canvas
    sample_fn: Ref  # (ctx, p, canvas, noise, callback) -> latents
    inputs: tuple[TaskInput, ...] = ()
    model_kinds: tuple[str, ...] = ("none",)  # INPUT_KINDS it runs
    defaults: Mapping[str, Any] = field(default_factory=dict)  # field defaults where the task's differ
    # The working size its inputs give: used when width/height are not given, or always where the
    # task has no width/height fields (outpainting works at the canvas size).
    size_fn: Ref | None = None  # (inputs) -> (width, height)
    infotext_fn: Ref = lambda p, cfg: {}  # (p, model config) -> its infotext fields

    def prepare(self, ctx: Any, p: GenerationParams, inputs: Inputs) -> Any:
        return resolved(self.prepare_fn)(ctx, p, inputs)

    def sample(self, ctx: Any, p: GenerationParams, canvas: Any, noise: Any = None, callback: Any = None) -> Any:
        return resolved(self.sample_fn)(ctx, p, canvas, noise, callback)

    def infotext(self, p: GenerationParams, cfg: ModelConfig) -> dict[str, object]:
        return resolved(self.infotext_fn)(p, cfg)

    def check_model(self, cfg: ModelConfig) -> None:
        if cfg.inputs not in self.model_kinds:
            wanted = " or ".join(INPUT_KINDS[k].what for k in self.model_kinds)
            raise ValueError(f"{self.name} needs {wanted}; this is {cfg.kind.what}")

    def check_inputs(self, inputs: Inputs) -> dict[str, Any]:
        """The inputs with defaults filled in; unknown or missing ones are clear errors."""
        known = {i.name: i for i in self.inputs}
        unknown = sorted(set(inputs) - set(known))
        if unknown:
            raise ValueError(f"{self.name} takes no {', '.join(unknown)}; its inputs are {', '.join(known) or 'none'}")
        missing = [i.name for i in self.inputs if i.required and inputs.get(i.name) is None]
        if missing:
            raise ValueError(f"{self.name} needs {' and '.join(missing)}")
        return {name: inputs.get(name, i.default) for name, i in known.items()}

    @property
    def uses_strength(self) -> bool:
        return "denoising_strength" in self.fields

    def working_size(self, p: GenerationParams, inputs: Inputs, resolution: int) -> tuple[int, int]:
        """Width and height: as given, else the inputs' size, else the model's resolution."""
        size = resolved(self.size_fn)(inputs) if self.size_fn else (resolution, resolution)
        if "width" not in self.fields:
            return size
        return p.width or size[0], p.height or size[1]


def picture_size(inputs: Inputs) -> tuple[int, int]:
    """A picture's size rounded down to multiples of 8 (the latent is 1/8 of the picture)."""
    image = inputs["image"]
    return max(8, image.width // 8 * 8), max(8, image.height // 8 * 8)


def strength_infotext(p: GenerationParams, cfg: ModelConfig) -> dict[str, object]:
    return {"Denoising strength": p.denoising_strength}


def inpaint_infotext(p: GenerationParams, cfg: ModelConfig) -> dict[str, object]:
    return {
        "Denoising strength": p.denoising_strength,
        "Conditional mask weight": p.mask_strength if cfg.inputs == "inpaint" else None,
        "Mask blur": p.mask_blur,
        "Mask mode": "Inpaint not masked" if p.invert_mask else None,
        "Masked content": p.masked_content.replace("-", " "),
        "Inpaint area": "Only masked" if p.inpaint_area == "masked" else None,
        "Masked area padding": p.inpaint_padding if p.inpaint_area == "masked" else None,
        "Soft inpainting": True if p.soft_inpainting else None,
        "Inpaint method": p.inpaint_method if p.inpaint_method != "auto" else None,
    }


IMAGE = TaskInput("image", "picture", "the starting picture", flags=("--image", "-i"), required=True)
MASK = TaskInput("mask", "mask", "white repaints, black keeps; or an RGBA picture's alpha", required=True)
RESIZE_MASK = TaskInput("resize_mask", "flag", "resize a mask of another size instead of refusing it", default=False)
SIDES = tuple(TaskInput(side, "int", f"pixels to add on the {side}", default=0)
              for side in ("left", "right", "top", "bottom"))
DEPTH_MAP = TaskInput("depth_map", "depthmap", "a depth map picture (8 or 16-bit grey, larger = nearer) instead "
                      "of estimating one")
DEPTH_MODEL = TaskInput("depth_model", "path", "a DPT depth-estimation folder (Intel/dpt-hybrid-midas layout); "
                        "default: the checkpoint's own")
FILL = TaskInput("fill", "choice", "what the new area starts as", default="edges", choices=("edges", "noise"))

COMMON_FIELDS = ("prompt", "negative_prompt", "steps", "cfg_scale", "sampler", "scheduler", "seed", "width", "height",
                 "batch_size", "clip_skip", "emphasis", "loras", "eta", "s_noise", "guidance_rescale",
                 "subseed", "subseed_strength", "seed_resize_from")
HIRES_FIELDS = ("hires_scale", "hires_resize", "hires_upscaler", "hires_steps", "hires_denoise", "hires_sampler",
                "hires_scheduler", "hires_prompt", "hires_negative_prompt")
IMG2IMG_FIELDS = ("denoising_strength", "resize_mode")
MASK_FIELDS = ("mask_blur", "masked_content", "inpaint_method", "mask_strength", "paste_back", "soft_inpainting")
INPAINT_FIELDS = IMG2IMG_FIELDS + MASK_FIELDS + ("invert_mask", "inpaint_area", "inpaint_padding")

# No variation seeds: the upscaler's seed draws its augmentation noise before the latent noise.
UPSCALE_FIELDS = tuple(f for f in COMMON_FIELDS if f not in ("width", "height", "subseed", "subseed_strength",
                                                             "seed_resize_from")) + ("noise_level", "upscale_tile")

TASKS: dict[str, Task] = {t.name: t for t in (
    Task("txt2img", "generate pictures from a prompt", COMMON_FIELDS + HIRES_FIELDS, "no_canvas", "txt2img_sample",
         infotext_fn="txt2img_infotext"),
    Task("img2img", "generate pictures from a picture and a prompt", COMMON_FIELDS + IMG2IMG_FIELDS,
         "fitted_prepare", "img2img_latents", inputs=(IMAGE,), size_fn=picture_size, infotext_fn=strength_infotext),
    Task("depth2img", "img2img that keeps the picture's depth (SD 2 depth models)", COMMON_FIELDS + IMG2IMG_FIELDS,
         "depth2img_prepare", "img2img_latents", inputs=(IMAGE, DEPTH_MAP, DEPTH_MODEL), model_kinds=("depth",),
         defaults={"denoising_strength": 0.8}, size_fn=picture_size, infotext_fn=strength_infotext),
    Task("upscale", "a 4x larger picture by the SD x4 upscaler", UPSCALE_FIELDS,
         "upscale_prepare", "upscale_latents", inputs=(IMAGE,),
         model_kinds=("lowres",), defaults={"steps": 75, "cfg_scale": 9.0, "sampler": "DDIM"},
         size_fn="upscale_working_size",
         infotext_fn=lambda p, cfg: {"Noise level": p.noise_level, "Tile": p.upscale_tile or None}),
    Task("inpaint", "repaint the white (or transparent) part of a mask", COMMON_FIELDS + INPAINT_FIELDS,
         "inpaint_prepare", "inpaint_sample", inputs=(IMAGE, MASK, RESIZE_MASK), model_kinds=("none", "inpaint"),
         defaults={"denoising_strength": 1.0}, size_fn=picture_size, infotext_fn=inpaint_infotext),
    Task("outpaint", "extend the canvas and paint the new area",
         tuple(f for f in COMMON_FIELDS if f not in ("width", "height")) + ("denoising_strength",) + MASK_FIELDS,
         "outpaint_prepare", "inpaint_sample", inputs=(IMAGE, *SIDES, FILL), model_kinds=("none", "inpaint"),
         defaults={"denoising_strength": 1.0}, infotext_fn=inpaint_infotext, size_fn="outpaint_working_size"),
)}


def find_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; choose from {', '.join(TASKS)}")
    return TASKS[name]


def runnable(cfg: ModelConfig) -> list[str]:
    """The tasks that run a model of this kind."""
    return [t.name for t in TASKS.values() if cfg.inputs in t.model_kinds]
