"""The tasks' functions, named in the task table (`stablekit.task_table.TASKS`), and `run_task`.

Each task is `prepare` (its pictures at the working size, and how results go back: a Canvas) and
`sample` (the latent work, ending at latents); decoding, paste-back and crop-back are the shared
`editing.finish`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import ModelConfig
from ..diffusion.common import Callback
from ..images import to_tensor
from ..params import GenerationParams
from ..task_table import Inputs, Task
from .conditioning import Pictures, TaskContext, extra_inputs, guided_denoiser
from .control import cropped_to
from .depth import depth_map_from_picture
from .editing import Canvas, finish, fitted_canvas, inpaint_canvas, outpaint_canvas, outpaint_size
from .hires import hires_infotext, hires_pass
from .inpainting import inpaint_latents
from .steps import denoise, encode_picture, plan_sampling
from .upscale import upscale_canvas, upscale_latents, upscale_size  # noqa: F401 - upscale_latents is named in the table


def no_canvas(ctx: TaskContext, p: GenerationParams, inputs: Inputs) -> Canvas:
    return Canvas()


def txt2img_infotext(p: GenerationParams, cfg: ModelConfig) -> dict[str, object]:
    return hires_infotext(p)


def fitted_prepare(ctx: TaskContext, p: GenerationParams, inputs: Inputs) -> Canvas:
    return fitted_canvas(inputs["image"], p, ctx.device)


def inpaint_prepare(ctx: TaskContext, p: GenerationParams, inputs: Inputs) -> Canvas:
    return inpaint_canvas(inputs["image"], inputs["mask"], p, ctx.device, inputs["resize_mask"])


def upscale_prepare(ctx: TaskContext, p: GenerationParams, inputs: Inputs) -> Canvas:
    return upscale_canvas(inputs["image"], ctx.device)


def upscale_working_size(inputs: Inputs) -> tuple[int, int]:
    return upscale_size(inputs["image"])


def outpaint_working_size(inputs: Inputs) -> tuple[int, int]:
    return outpaint_size(inputs["image"], *(inputs[side] for side in ("left", "right", "top", "bottom")))


def txt2img_latents(ctx: TaskContext, p: GenerationParams, canvas: Canvas, noise: torch.Tensor | None = None,
                    callback: Callback | None = None) -> torch.Tensor:
    """Text to latents [B, 4, h, w]; `noise` [B, 4, h, w] replaces the seeded noise."""
    plan = plan_sampling(ctx.schedule, p, ctx.latent_shape(p.width, p.height), ctx.device, noise)
    return denoise(guided_denoiser(ctx, p, plan), plan, callback=callback)


def txt2img_sample(ctx: TaskContext, p: GenerationParams, canvas: Canvas, noise: torch.Tensor | None = None,
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


def inpaint_sample(ctx: TaskContext, p: GenerationParams, canvas: Canvas, noise: torch.Tensor | None = None,
                    callback: Callback | None = None) -> torch.Tensor:
    return inpaint_latents(ctx, p, canvas.picture, canvas.mask, noise, callback)


def outpaint_prepare(ctx: TaskContext, p: GenerationParams, inputs: Inputs) -> Canvas:
    """The extended canvas, inpainted. The new area is repainted whole and the mask's blur reaches only
    into the picture: blurred outwards, it let fill pixels (noise, stretched edges) show as a seam."""
    sides = {k: inputs[k] for k in ("left", "right", "top", "bottom")}
    picture, mask = outpaint_canvas(inputs["image"], **sides, fill=inputs["fill"])
    canvas = inpaint_canvas(picture, mask, p, ctx.device)
    new_area = to_tensor(mask)[:, :1].to(ctx.device)  # [1, 1, H, W], the canvas is the working size
    return replace(canvas, mask=torch.maximum(canvas.mask, new_area),
                   paste_mask=None if canvas.paste_mask is None else torch.maximum(canvas.paste_mask, new_area))


def depth2img_prepare(ctx: TaskContext, p: GenerationParams, inputs: Inputs) -> Canvas:
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
