"""The task table: each task registered once, with its fields, inputs and three short functions.

A task is `prepare` (its pictures at the working size, and how results go back: a Canvas),
`sample` (the latent work, ending at latents) and its infotext fields; decoding, paste-back and
crop-back are the shared `editing.finish`. The Engine, the CLI, the server worker and the job
routes all dispatch through TASKS, so adding a task is one entry here plus its functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
from PIL import Image

from ..config import INPUT_KINDS, ModelConfig
from ..diffusion.samplers import Callback
from ..images import to_tensor
from ..params import GenerationParams
from .conditioning import Pictures, TaskContext, extra_inputs, guided_denoiser
from .control import cropped_to
from .depth import depth_map_from_picture
from .editing import Canvas, finish, fitted_canvas, inpaint_canvas, outpaint_canvas, outpaint_size
from .hires import hires_infotext, hires_pass
from .inpainting import inpaint_latents
from .steps import denoise, encode_picture, plan_sampling
from .upscale import upscale_canvas, upscale_latents, upscale_size

Inputs = Mapping[str, Any]


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
    prepare: Callable[[TaskContext, GenerationParams, Inputs], Canvas]
    sample: Callable[[TaskContext, GenerationParams, Canvas, torch.Tensor | None, Callback | None], torch.Tensor]
    inputs: tuple[TaskInput, ...] = ()
    model_kinds: tuple[str, ...] = ("none",)  # INPUT_KINDS it runs
    defaults: Mapping[str, Any] = field(default_factory=dict)  # field defaults where the task's differ
    # The working size its inputs give: used when width/height are not given, or always where the
    # task has no width/height fields (outpainting works at the canvas size).
    size_of: Callable[[Inputs], tuple[int, int]] | None = None
    infotext: Callable[[GenerationParams, ModelConfig], dict[str, object]] = lambda p, cfg: {}

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
        size = self.size_of(inputs) if self.size_of else (resolution, resolution)
        if "width" not in self.fields:
            return size
        return p.width or size[0], p.height or size[1]


# --- the tasks -------------------------------------------------------------------------------------


def _no_canvas(ctx: TaskContext, p: GenerationParams, inputs: Inputs) -> Canvas:
    return Canvas()


def txt2img_latents(ctx: TaskContext, p: GenerationParams, canvas: Canvas, noise: torch.Tensor | None = None,
                    callback: Callback | None = None) -> torch.Tensor:
    """Text to latents [B, 4, h, w]; `noise` [B, 4, h, w] replaces the seeded noise."""
    plan = plan_sampling(ctx.schedule, p, ctx.latent_shape(p.width, p.height), ctx.device, noise)
    return denoise(guided_denoiser(ctx, p, plan), plan, callback=callback)


def _txt2img_sample(ctx: TaskContext, p: GenerationParams, canvas: Canvas, noise: torch.Tensor | None = None,
                    callback: Callback | None = None) -> torch.Tensor:
    """txt2img, then the hires fix's second pass where asked for; progress counts both passes' steps."""
    if not p.hires:
        return txt2img_latents(ctx, p, canvas, noise, callback)
    second = (p.hires_steps or p.steps) if p.hires_denoise else 0  # denoise 0: the enlarged first pass as it is
    first, total = p.steps, p.steps + second
    latents = txt2img_latents(ctx, p, canvas, noise, _progress(callback, 0, total))
    return hires_pass(ctx, p, latents, _progress(callback, first, total))


def _progress(callback: Callback | None, done: int, total: int) -> Callback | None:
    """A pass's step callback reported as steps of the whole job."""
    if callback is None:
        return None
    return lambda i, n, x0: callback(done + i, total, x0)


def img2img_latents(ctx: TaskContext, p: GenerationParams, canvas: Canvas, noise: torch.Tensor | None = None,
                    callback: Callback | None = None) -> torch.Tensor:
    """The canvas picture's latent noised to the strength's point of the schedule, then sampled from
    there: only the last int(steps * strength) steps run, as diffusers do. A depth model gets the
    canvas's depth map as its extra channel (depth2img)."""
    plan = plan_sampling(ctx.schedule, p, ctx.latent_shape(p.width, p.height), ctx.device, noise,
                         p.denoising_strength)
    start = encode_picture(ctx.model, canvas.picture.expand(p.batch_size, -1, -1, -1))
    concat = extra_inputs(ctx, Pictures(canvas.picture, depth=canvas.depth), p.batch_size)
    return denoise(guided_denoiser(ctx, p, plan, concat), plan, start=start, callback=callback)


def _inpaint_sample(ctx: TaskContext, p: GenerationParams, canvas: Canvas, noise: torch.Tensor | None = None,
                    callback: Callback | None = None) -> torch.Tensor:
    return inpaint_latents(ctx, p, canvas.picture, canvas.mask, noise, callback)


def _picture_size(inputs: Inputs) -> tuple[int, int]:
    """A picture's size rounded down to multiples of 8 (the latent is 1/8 of the picture)."""
    image: Image.Image = inputs["image"]
    return max(8, image.width // 8 * 8), max(8, image.height // 8 * 8)


def _inpaint_infotext(p: GenerationParams, cfg: ModelConfig) -> dict[str, object]:
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


def _outpaint_prepare(ctx: TaskContext, p: GenerationParams, inputs: Inputs) -> Canvas:
    """The extended canvas, inpainted. The new area is repainted whole and the mask's blur reaches only
    into the picture: blurred outwards, it let fill pixels (noise, stretched edges) show as a seam."""
    sides = {k: inputs[k] for k in ("left", "right", "top", "bottom")}
    picture, mask = outpaint_canvas(inputs["image"], **sides, fill=inputs["fill"])
    canvas = inpaint_canvas(picture, mask, p, ctx.device)
    new_area = to_tensor(mask)[:, :1].to(ctx.device)  # [1, 1, H, W], the canvas is the working size
    return replace(canvas, mask=torch.maximum(canvas.mask, new_area),
                   paste_mask=None if canvas.paste_mask is None else torch.maximum(canvas.paste_mask, new_area))


def _depth2img_prepare(ctx: TaskContext, p: GenerationParams, inputs: Inputs) -> Canvas:
    """The fitted picture and its depth: the given map, or the estimator's prediction for the picture."""
    canvas = fitted_canvas(inputs["image"], p, ctx.device)
    if inputs["depth_map"] is not None and inputs["depth_model"] is not None:
        raise ValueError("give a depth map or a depth model, not both")
    if inputs["depth_map"] is not None:
        depth = depth_map_from_picture(inputs["depth_map"])
        if depth.shape[-2:] != canvas.picture.shape[-2:]:
            size = f"{depth.shape[-1]}x{depth.shape[-2]}"
            ctx.notes["Depth map"] = f"{size} resized"  # it goes straight to the latent size, as any map does
        return replace(canvas, depth=depth)
    if ctx.depth_estimator is None:
        raise ValueError("no depth estimator: give --depth-map or --depth-model")
    estimator = ctx.depth_estimator(inputs["depth_model"])
    return replace(canvas, depth=estimator.predict(canvas.picture))


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
    Task("txt2img", "generate pictures from a prompt", COMMON_FIELDS + HIRES_FIELDS, _no_canvas, _txt2img_sample,
         infotext=lambda p, cfg: hires_infotext(p)),
    Task("img2img", "generate pictures from a picture and a prompt", COMMON_FIELDS + IMG2IMG_FIELDS,
         lambda ctx, p, inputs: fitted_canvas(inputs["image"], p, ctx.device), img2img_latents,
         inputs=(IMAGE,), size_of=_picture_size,
         infotext=lambda p, cfg: {"Denoising strength": p.denoising_strength}),
    Task("depth2img", "img2img that keeps the picture's depth (SD 2 depth models)", COMMON_FIELDS + IMG2IMG_FIELDS,
         _depth2img_prepare, img2img_latents, inputs=(IMAGE, DEPTH_MAP, DEPTH_MODEL), model_kinds=("depth",),
         defaults={"denoising_strength": 0.8}, size_of=_picture_size,
         infotext=lambda p, cfg: {"Denoising strength": p.denoising_strength}),
    Task("upscale", "a 4x larger picture by the SD x4 upscaler", UPSCALE_FIELDS,
         lambda ctx, p, inputs: upscale_canvas(inputs["image"], ctx.device), upscale_latents, inputs=(IMAGE,),
         model_kinds=("lowres",), defaults={"steps": 75, "cfg_scale": 9.0, "sampler": "DDIM"},
         size_of=lambda inputs: upscale_size(inputs["image"]),
         infotext=lambda p, cfg: {"Noise level": p.noise_level, "Tile": p.upscale_tile or None}),
    Task("inpaint", "repaint the white (or transparent) part of a mask", COMMON_FIELDS + INPAINT_FIELDS,
         lambda ctx, p, inputs: inpaint_canvas(inputs["image"], inputs["mask"], p, ctx.device, inputs["resize_mask"]),
         _inpaint_sample, inputs=(IMAGE, MASK, RESIZE_MASK), model_kinds=("none", "inpaint"),
         defaults={"denoising_strength": 1.0}, size_of=_picture_size, infotext=_inpaint_infotext),
    Task("outpaint", "extend the canvas and paint the new area",
         tuple(f for f in COMMON_FIELDS if f not in ("width", "height")) + ("denoising_strength",) + MASK_FIELDS,
         _outpaint_prepare, _inpaint_sample, inputs=(IMAGE, *SIDES, FILL), model_kinds=("none", "inpaint"),
         defaults={"denoising_strength": 1.0}, infotext=_inpaint_infotext,
         size_of=lambda inputs: outpaint_size(inputs["image"], *(inputs[s.name] for s in SIDES))),
)}


def run_task(
    ctx: TaskContext, task: Task, p: GenerationParams, inputs: Inputs, noise: torch.Tensor | None = None,
    callback: Callback | None = None,
) -> tuple[torch.Tensor, dict[str, object]]:
    """Validated params and checked inputs -> pictures [B, 3, H, W] (prepare, sample, finish), and the
    infotext fields the job added (the embeddings its prompts used)."""
    task.check_model(ctx.model.cfg)
    ctx = replace(ctx, notes={})  # this job's own
    canvas = task.prepare(ctx, p, inputs)
    if canvas.box is not None and ctx.controls:  # the task works on a crop: so do the control maps
        whole = canvas.whole.shape
        ctx = replace(ctx, controls=cropped_to(ctx.controls, whole[-1], whole[-2], canvas.box))
    nothing_to_do = task.uses_strength and p.denoising_strength == 0  # the picture is kept as it is
    latents = None if nothing_to_do else task.sample(ctx, p, canvas, noise, callback)
    return finish(ctx.model, canvas, latents, p.batch_size), ctx.notes


def find_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; choose from {', '.join(TASKS)}")
    return TASKS[name]


def runnable(cfg: ModelConfig) -> list[str]:
    """The tasks that run a model of this kind."""
    return [t.name for t in TASKS.values() if cfg.inputs in t.model_kinds]
