"""The web UI's request fields -> GenerationParams and a task; results -> its response and `info`.

Each GenerationParams field is read from the place its declaration names (`params.Setting.api`):
prompt, negative_prompt, seed (-1 random, image i gets seed+i), sampler_name / sampler_index,
scheduler, steps, cfg_scale, width, height, batch_size, eta, s_noise, denoising_strength,
resize_mode 0-2, mask_blur (x = y), inpainting_fill, inpaint_full_res(_padding),
inpainting_mask_invert, override_settings {CLIP_stop_at_last_layers, inpainting_mask_weight}; and
stablekit's own fields where the web UI has none: guidance_rescale, inpainting_method (auto, blend
or model), paste_back, soft_inpainting. Also: mask, n_iter (iteration k starts at seed + k*batch_size,
as there), override_settings.sd_model_checkpoint, send_images, save_images, include_init_images,
infotext (fills fields the request left unset).

Hires fix: enable_hr with hr_scale or hr_resize_x/y, hr_upscaler (the web UI's names), hr_second_pass_steps,
denoising_strength, hr_sampler_name, hr_scheduler, hr_prompt, hr_negative_prompt, firstphase_width/height.
Variation seeds: subseed, subseed_strength, seed_resize_from_w/h.

Refused with 400, because silently ignoring them would give a different picture than asked for:
hr_checkpoint_name, restore_faces, tiling, s_churn/s_tmin/s_tmax/s_min_uncond != 0,
script_name, enabled alwayson_scripts other than ControlNet's (server/controlnet_api.py), styles, refiner_checkpoint, resize_mode 3 (latent),
initial_noise_multiplier != 1, latent_mask, mask_blur_x != mask_blur_y.

Accepted and ignored (no effect on the picture here): do_not_save_*, comments,
image_cfg_scale (instruct-pix2pix only), mask_round, disable_extra_networks, force_task_id (ids
are made by the server), the hires fields while enable_hr is false, other override_settings keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from ..diffusion.samplers import find_sampler
from ..images import parse_infotext
from ..params import MAX_SEED, Api, GenerationParams, settings
from ..pipeline.control import ControlUnit
from ..pipeline.hires import work_sizes
from ..task_table import HIRES_FIELDS, TASKS, Task
from .api_models import Depth2ImgRequest, Img2ImgRequest, ProcessingFields, Txt2ImgRequest, UpscaleRequest
from .config import Limits
from .errors import ApiError
from .uploads import decode_picture

@dataclass
class Work:
    """One job made concrete: what the worker runs."""

    task: str  # a name in the task table: txt2img, img2img or inpaint
    params: GenerationParams  # validated, with a concrete seed
    n_iter: int
    inputs: dict[str, Any] = field(default_factory=dict)  # the task's inputs (image, mask, ...)
    checkpoint: str | None = None  # override_settings.sd_model_checkpoint; None = the current model
    vae: str | None = None  # override_settings.sd_vae; None = the current VAE
    controls: tuple[ControlUnit, ...] = ()  # alwayson_scripts.controlnet units (models still by name)
    control_maps: tuple[bool, ...] = ()  # per unit: its detected map goes back after the pictures

    @property
    def image(self) -> Image.Image | None:
        return self.inputs.get("image")

    @property
    def mask(self) -> Image.Image | None:
        return self.inputs.get("mask")


# The tasks reachable over HTTP and the web UI's request shape for each (inpainting is img2img with a
# mask there; the job API also takes it by its own name).
REQUESTS: dict[str, type[ProcessingFields]] = {"txt2img": Txt2ImgRequest, "img2img": Img2ImgRequest,
                                               "inpaint": Img2ImgRequest, "depth2img": Depth2ImgRequest,
                                               "upscale": UpscaleRequest}


def parse_request(task: str, body: dict[str, Any]) -> ProcessingFields:
    if task not in REQUESTS:
        raise ApiError(400, f"task must be one of {', '.join(REQUESTS)}, got {task!r}")
    return REQUESTS[task].model_validate(body)


def _v(req: ProcessingFields, name: str) -> Any:
    """The field's value, null meaning the API's default."""
    value = getattr(req, name)
    return type(req).model_fields[name].get_default(call_default_factory=True) if value is None else value


def _refuse_unsupported(req: ProcessingFields) -> None:
    def no(cond: bool, what: str) -> None:
        if cond:
            raise ApiError(400, f"{what} is not supported by this server")

    no(getattr(req, "hr_checkpoint_name", None) not in (None, "", "Use same checkpoint"),
       "hr_checkpoint_name (another checkpoint for the second pass)")
    no(bool(req.restore_faces), "restore_faces")
    no(bool(req.tiling), "tiling")
    for name in ("s_churn", "s_tmin", "s_tmax", "s_min_uncond"):
        no(bool(getattr(req, name)), name)
    no(bool(req.script_name), f"script_name {req.script_name!r}")
    no(bool(req.styles), "styles")
    no(bool(req.refiner_checkpoint), "refiner_checkpoint")
    for name, script in (req.alwayson_scripts or {}).items():
        args = script.get("args", []) if isinstance(script, dict) else script
        no(name.lower() != "controlnet" and bool(args) and args != [False], f"the always-on script {name!r}")
    if isinstance(req, Img2ImgRequest):
        no(_v(req, "resize_mode") == 3, "resize_mode 3 (latent upscale)")
        no(req.initial_noise_multiplier not in (None, 1, 1.0), "initial_noise_multiplier other than 1")
        no(bool(req.latent_mask), "latent_mask")


def _apply_infotext(req: ProcessingFields) -> ProcessingFields:
    """Fields the request left unset take their values from `infotext` (the web UI's paste-params)."""
    if not req.infotext:
        return req
    info = parse_infotext(req.infotext)
    mapping = {"prompt": "Prompt", "negative_prompt": "Negative prompt", "steps": "Steps", "sampler_name": "Sampler",
               "scheduler": "Schedule type", "cfg_scale": "CFG scale", "seed": "Seed", "width": "Size-1",
               "height": "Size-2", "denoising_strength": "Denoising strength"}
    updates = {f: info[k] for f, k in mapping.items() if k in info and f not in req.model_fields_set}
    # Settings the infotext records go to override_settings, under the web UI's option names.
    options = {"Clip skip": "CLIP_stop_at_last_layers", "Emphasis": "emphasis"}
    given = req.override_settings or {}
    overrides = {o: _int_or_text(info[k]) for k, o in options.items() if k in info and o not in given}
    if overrides:
        updates["override_settings"] = {**given, **overrides}
    return type(req).model_validate({**req.model_dump(), **updates}) if updates else req


def _int_or_text(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _limits(p: GenerationParams, n_iter: int, limits: Limits) -> None:
    sizes = [(p.width, p.height)] + (work_sizes(p) if p.hires else [])  # hires: every size it works at
    for w, h in sizes:
        if w * h > limits.max_pixels:
            raise ApiError(400, f"{w}x{h} is over this server's limit of {limits.max_pixels} pixels")
    for name, steps in (("steps", p.steps), ("hr_second_pass_steps", p.hires_steps if p.hires else 0)):
        if steps > limits.max_steps:
            raise ApiError(400, f"{name} {steps} is over this server's limit of {limits.max_steps}")
    if not 1 <= n_iter:
        raise ApiError(400, f"n_iter must be at least 1, got {n_iter}")
    if p.batch_size * n_iter > limits.max_batch:
        raise ApiError(400, f"batch_size x n_iter = {p.batch_size * n_iter} pictures is over this server's limit "
                            f"of {limits.max_batch}")


def api_value(req: ProcessingFields, name: str, api: Api, defaults: dict[str, Any]) -> Any:
    """One GenerationParams field's value from a request, by its declaration; None: not given.

    `defaults` holds the server's settings for override_settings keys (CLIP_stop_at_last_layers).
    """
    if api.where == "override":
        value = (req.override_settings or {}).get(api.key, defaults.get(name))
    else:
        value = _v(req, api.key)
    if value is None or api.values is None:
        return value
    if value not in api.values:
        choices = ", ".join(f"{k!r} ({v})" for k, v in api.values.items())
        raise ApiError(400, f"{api.key} must be one of {choices}, got {value!r}")
    return api.values[value]


def request_fields(task: Task, req: ProcessingFields, defaults: dict[str, Any]) -> dict[str, Any]:
    """The task's GenerationParams fields from a web-UI request, through each field's declared API place."""
    declared = settings()
    values = {name: api_value(req, name, declared[name].api, defaults) for name in task.fields
              if declared[name].api is not None}  # the others name files on the server's disk
    # Where the web UI's request differs from a plain field:
    values["sampler"] = req.sampler_name or req.sampler_index or "Euler"  # sampler_index is the older name
    values["scheduler"] = req.scheduler or "automatic"  # empty: the sampler's own
    if "eta" in values and "eta" not in find_sampler(values["sampler"])[0].options:
        values["eta"] = None  # the web UI ignores eta where a sampler has none
    if "mask_blur" in task.fields:
        blur_x, blur_y = _v(req, "mask_blur_x"), _v(req, "mask_blur_y")
        if req.mask_blur is not None:
            blur_x = blur_y = req.mask_blur
        if blur_x != blur_y:
            raise ApiError(400, f"mask_blur_x {blur_x} != mask_blur_y {blur_y}: only round blur is supported")
        values["mask_blur"] = float(blur_x)
    if "seed_resize_from" in task.fields:
        w, h = _v(req, "seed_resize_from_w"), _v(req, "seed_resize_from_h")
        values["seed_resize_from"] = (w, h) if w > 0 and h > 0 else None  # the web UI: -1 or 0 = off
    if "hires_scale" in task.fields:
        values.update(_hires_fields(req, values))
    return {k: v for k, v in values.items() if v is not None}


HIRES_SAME = {"hires_sampler": "Use same sampler", "hires_scheduler": "Use same scheduler"}  # the web UI's choices


def _hires_fields(req: Txt2ImgRequest, values: dict[str, Any]) -> dict[str, Any]:
    """enable_hr switches the hires fields on; hr_resize_x/y (either > 0) replace hr_scale; the legacy
    firstphase_width/height make width x height the target and themselves the first pass."""
    off = {name: None for name in HIRES_FIELDS}
    if not req.enable_hr:
        return off  # the hires fields are ignored, as in the web UI
    out: dict[str, Any] = {"hires_upscaler": req.hr_upscaler or "latent", "hires_resize": None}
    rx, ry = _v(req, "hr_resize_x"), _v(req, "hr_resize_y")
    fw, fh = _v(req, "firstphase_width"), _v(req, "firstphase_height")
    if fw or fh:
        if not (fw > 0 and fh > 0):
            raise ApiError(400, "firstphase_width and firstphase_height must both be set")
        out.update(hires_scale=None, hires_resize=(values.get("width") or 512, values.get("height") or 512),
                   width=fw, height=fh)
    elif rx or ry:
        out.update(hires_scale=None, hires_resize=(rx, ry))
    for name, same in HIRES_SAME.items():
        if values.get(name) == same:
            out[name] = None
    return out


def to_work(task: str, req: ProcessingFields, limits: Limits, allow_urls: bool, clip_skip: int = 1) -> Work:
    """Validate a request into Work; every refusal is an ApiError or ValueError (400)."""
    req = _apply_infotext(req)
    _refuse_unsupported(req)
    inputs: dict[str, Any] = {}
    if isinstance(req, Img2ImgRequest):
        if not req.init_images:
            raise ApiError(404, "Init image not found", name="NotFound")
        inputs["image"] = decode_picture(req.init_images[0], limits, allow_urls, "init_images[0]")
        if task == "inpaint" and not req.mask:
            raise ApiError(400, "inpaint needs a mask")
        takes = {i.name for i in TASKS[task].inputs}
        if req.mask and task != "img2img" and "mask" not in takes:  # img2img with a mask is inpainting
            raise ApiError(400, f"{task} takes no mask")
        if "depth_map" in takes and getattr(req, "depth_map", None):
            inputs["depth_map"] = decode_picture(req.depth_map, limits, allow_urls, "depth_map", mode=None)
        if req.mask:
            task = "inpaint"
            inputs["mask"] = binary_mask(decode_picture(req.mask, limits, allow_urls, "mask", mode=None))
            inputs["resize_mask"] = True  # the web UI resizes a mask of another size
    fields = request_fields(TASKS[task], req, {"clip_skip": clip_skip})
    try:
        params = GenerationParams(**fields).validated()
    except TypeError as e:
        raise ApiError(400, str(e)) from None
    n_iter = _v(req, "n_iter")
    t = TASKS[task]
    if "width" not in t.fields:  # the inputs give the size (upscale: 4x the picture), as the Engine finds it
        width, height = t.working_size(params, inputs, params.width or 512)
        params = replace(params, width=width, height=height)
    _limits(params, n_iter, limits)
    for name, first in (("seed", params.seed), ("subseed", params.subseed)):
        if first + params.batch_size * n_iter - 1 > MAX_SEED:
            raise ApiError(400, f"{name} {first} + {params.batch_size * n_iter} pictures goes past {MAX_SEED}")
    overrides = req.override_settings or {}
    checkpoint, vae = overrides.get("sd_model_checkpoint"), overrides.get("sd_vae")
    for name, value in (("sd_model_checkpoint", checkpoint), ("sd_vae", vae)):
        if value is not None and not isinstance(value, str):
            raise ApiError(400, f"override_settings.{name} must be a string")
    from .controlnet_api import parse_units

    controls, maps = parse_units(req.alwayson_scripts, limits, allow_urls)
    return Work(task, params, n_iter, inputs, checkpoint, vae, controls, maps)


def binary_mask(mask: Image.Image) -> Image.Image:
    """The web UI's mask reading: the alpha channel of an RGBA picture that has transparency (opaque =
    repaint), otherwise the grey levels; then rounded to black and white at 128."""
    if mask.mode in ("RGBA", "LA") and mask.getextrema()[-1] != (255, 255):
        grey = mask.getchannel("A")
    else:
        grey = mask.convert("L")
    return grey.point(lambda v: 255 if v > 128 else 0)


def echo(req: ProcessingFields) -> dict[str, Any]:
    """The response's `parameters`: the request's fields; init images and mask only if asked for."""
    out = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        out["init_images"], out["mask"] = None, None
    return out


def info_json(work: Work, infotexts: list[str], model_name: str, model_hash: str | None,
              job_timestamp: str, is_inpainting_model: bool, version: str) -> dict[str, Any]:
    """`Processed.js()`: what the web UI puts, JSON-encoded, into the response's `info`."""
    p = work.params
    n = len(infotexts)
    seeds = [p.seed + (0 if p.subseed_strength else i) for i in range(n)]
    resize = p.seed_resize_from or (-1, -1)
    return {
        "prompt": p.prompt, "all_prompts": [p.prompt] * n, "negative_prompt": p.negative_prompt,
        "all_negative_prompts": [p.negative_prompt] * n, "seed": p.seed, "all_seeds": seeds,
        "subseed": p.subseed, "all_subseeds": [p.subseed + i for i in range(n)], "subseed_strength": p.subseed_strength,
        "width": p.width, "height": p.height, "sampler_name": p.sampler, "cfg_scale": p.cfg_scale,
        "steps": p.steps, "batch_size": p.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model_name, "sd_model_hash": model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": resize[0], "seed_resize_from_h": resize[1],
        "denoising_strength": p.denoising_strength if work.task != "txt2img" else p.hires_denoise if p.hires else None,
        "extra_generation_params": {"Schedule type": p.schedule_label}, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": [], "job_timestamp": job_timestamp, "clip_skip": p.clip_skip,
        "is_using_inpainting_conditioning": is_inpainting_model and work.task == "inpaint", "version": version,
    }


def iteration_params(work: Work, k: int) -> GenerationParams:
    """Iteration k of n_iter starts at seed + k * batch_size, as in the web UI; with a variation strength
    the seed stays and the subseed moves on instead."""
    p, step = work.params, k * work.params.batch_size
    return replace(p, seed=p.seed + (0 if p.subseed_strength else step), subseed=p.subseed + step)
