"""The web UI's request fields -> GenerationParams and a task; results -> its response and `info`.

Implemented: prompt, negative_prompt, seed (-1 random, image i gets seed+i), sampler_name /
sampler_index, scheduler, steps, cfg_scale, width, height, batch_size, n_iter (iteration k starts
at seed + k*batch_size, as there), eta, s_noise, denoising_strength, resize_mode 0-2, mask,
mask_blur (x = y), inpainting_fill, inpaint_full_res(_padding), inpainting_mask_invert,
override_settings {sd_model_checkpoint, CLIP_stop_at_last_layers}, send_images, save_images,
include_init_images, infotext (fills fields the request left unset); and one field of stablekit's
own, inpainting_method (auto, blend or model; the browser UI's picker).

Refused with 400, because silently ignoring them would give a different picture than asked for:
enable_hr, restore_faces, tiling, subseed_strength > 0, s_churn/s_tmin/s_tmax/s_min_uncond != 0,
script_name, enabled alwayson_scripts, styles, refiner_checkpoint, resize_mode 3 (latent),
initial_noise_multiplier != 1, latent_mask, mask_blur_x != mask_blur_y.

Accepted and ignored (no effect on the picture here): seed_resize_from_*, do_not_save_*, comments,
image_cfg_scale (instruct-pix2pix only), mask_round, disable_extra_networks, force_task_id (ids
are made by the server), the hires fields while enable_hr is false, other override_settings keys.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from ..diffusion.samplers import find_sampler
from ..images import parse_infotext
from ..params import MAX_SEED, GenerationParams
from .api_models import Img2ImgRequest, ProcessingFields, Txt2ImgRequest
from .config import Limits
from .errors import ApiError
from .uploads import decode_picture

RESIZE_MODES = {0: "just-resize", 1: "crop-and-resize", 2: "resize-and-fill"}
INPAINTING_FILL = {0: "fill", 1: "original", 2: "latent-noise", 3: "latent-nothing"}


@dataclass
class Work:
    """One job made concrete: what the worker runs."""

    task: str  # txt2img, img2img or inpaint
    params: GenerationParams  # validated, with a concrete seed
    n_iter: int
    image: Image.Image | None = None
    mask: Image.Image | None = None
    checkpoint: str | None = None  # override_settings.sd_model_checkpoint; None = the current model

    @property
    def images_total(self) -> int:
        return self.params.batch_size * self.n_iter


def parse_request(task: str, body: dict[str, Any]) -> ProcessingFields:
    model = Img2ImgRequest if task == "img2img" else Txt2ImgRequest
    return model.model_validate(body)


def _v(req: ProcessingFields, name: str) -> Any:
    """The field's value, null meaning the API's default."""
    value = getattr(req, name)
    return type(req).model_fields[name].get_default(call_default_factory=True) if value is None else value


def _refuse_unsupported(req: ProcessingFields) -> None:
    def no(cond: bool, what: str) -> None:
        if cond:
            raise ApiError(400, f"{what} is not supported by this server")

    no(bool(getattr(req, "enable_hr", False)), "enable_hr (hires fix)")
    no(bool(req.restore_faces), "restore_faces")
    no(bool(req.tiling), "tiling")
    no(bool(req.subseed_strength), "subseed_strength (variation seeds)")
    for name in ("s_churn", "s_tmin", "s_tmax", "s_min_uncond"):
        no(bool(getattr(req, name)), name)
    no(bool(req.script_name), f"script_name {req.script_name!r}")
    no(bool(req.styles), "styles")
    no(bool(req.refiner_checkpoint), "refiner_checkpoint")
    for name, script in (req.alwayson_scripts or {}).items():
        args = script.get("args", []) if isinstance(script, dict) else script
        no(bool(args) and args != [False], f"the always-on script {name!r}")
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
    return type(req).model_validate({**req.model_dump(), **updates}) if updates else req


def _limits(p: GenerationParams, n_iter: int, limits: Limits) -> None:
    if p.width * p.height > limits.max_pixels:
        raise ApiError(400, f"{p.width}x{p.height} is over this server's limit of {limits.max_pixels} pixels")
    if p.steps > limits.max_steps:
        raise ApiError(400, f"steps {p.steps} is over this server's limit of {limits.max_steps}")
    if not 1 <= n_iter:
        raise ApiError(400, f"n_iter must be at least 1, got {n_iter}")
    if p.batch_size * n_iter > limits.max_batch:
        raise ApiError(400, f"batch_size x n_iter = {p.batch_size * n_iter} pictures is over this server's limit "
                            f"of {limits.max_batch}")


def to_work(task: str, req: ProcessingFields, limits: Limits, allow_urls: bool, clip_skip: int = 1) -> Work:
    """Validate a request into Work; every refusal is an ApiError or ValueError (400)."""
    req = _apply_infotext(req)
    _refuse_unsupported(req)
    sampler = req.sampler_name or req.sampler_index or "Euler"
    spec, _ = find_sampler(sampler)
    overrides = req.override_settings or {}
    clip = overrides.get("CLIP_stop_at_last_layers", clip_skip)
    eta = req.eta if "eta" in spec.options else None  # the web UI ignores eta where a sampler has none
    fields: dict[str, Any] = dict(
        prompt=_v(req, "prompt"), negative_prompt=_v(req, "negative_prompt"), steps=_v(req, "steps"),
        cfg_scale=float(_v(req, "cfg_scale")), sampler=sampler, scheduler=req.scheduler or "automatic",
        seed=_v(req, "seed"), width=_v(req, "width"), height=_v(req, "height"), batch_size=_v(req, "batch_size"),
        clip_skip=clip, eta=eta, s_noise=1.0 if req.s_noise is None else float(req.s_noise),
    )
    if not isinstance(clip, int) or isinstance(clip, bool):
        raise ApiError(400, f"CLIP_stop_at_last_layers must be a whole number, got {clip!r}")
    n_iter = _v(req, "n_iter")
    image = mask = None
    if isinstance(req, Img2ImgRequest):
        if not req.init_images:
            raise ApiError(404, "Init image not found", name="NotFound")
        if _v(req, "resize_mode") not in RESIZE_MODES:
            raise ApiError(400, f"resize_mode must be 0 (just resize), 1 (crop and resize) or 2 (resize and fill), "
                                f"got {req.resize_mode}")
        image = decode_picture(req.init_images[0], limits, allow_urls, "init_images[0]")
        fields.update(denoising_strength=float(_v(req, "denoising_strength")),
                      resize_mode=RESIZE_MODES[_v(req, "resize_mode")])
        if req.mask:
            task = "inpaint"
            mask = binary_mask(decode_picture(req.mask, limits, allow_urls, "mask", mode=None))
            blur_x, blur_y = _v(req, "mask_blur_x"), _v(req, "mask_blur_y")
            if req.mask_blur is not None:
                blur_x = blur_y = req.mask_blur
            if blur_x != blur_y:
                raise ApiError(400, f"mask_blur_x {blur_x} != mask_blur_y {blur_y}: only round blur is supported")
            fill = _v(req, "inpainting_fill")
            if fill not in INPAINTING_FILL:
                raise ApiError(400, f"inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 "
                                    f"(latent nothing), got {fill}")
            fields.update(mask_blur=float(blur_x), masked_content=INPAINTING_FILL[fill],
                          invert_mask=bool(_v(req, "inpainting_mask_invert")),
                          inpaint_area="masked" if _v(req, "inpaint_full_res") else "whole",
                          inpaint_padding=_v(req, "inpaint_full_res_padding"),
                          inpaint_method=req.inpainting_method or "auto")
    try:
        params = GenerationParams(**fields).validated()
    except TypeError as e:
        raise ApiError(400, str(e)) from None
    _limits(params, n_iter, limits)
    if params.seed + params.batch_size * n_iter - 1 > MAX_SEED:
        raise ApiError(400, f"seed {params.seed} + {params.batch_size * n_iter} pictures goes past {MAX_SEED}")
    checkpoint = overrides.get("sd_model_checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise ApiError(400, "override_settings.sd_model_checkpoint must be a string")
    return Work(task, params, n_iter, image, mask, checkpoint)


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
    seeds = [p.seed + i for i in range(n)]
    subseed = random.randrange(MAX_SEED)
    return {
        "prompt": p.prompt, "all_prompts": [p.prompt] * n, "negative_prompt": p.negative_prompt,
        "all_negative_prompts": [p.negative_prompt] * n, "seed": p.seed, "all_seeds": seeds,
        "subseed": subseed, "all_subseeds": [subseed + i for i in range(n)], "subseed_strength": 0,
        "width": p.width, "height": p.height, "sampler_name": p.sampler, "cfg_scale": p.cfg_scale,
        "steps": p.steps, "batch_size": p.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model_name, "sd_model_hash": model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": p.denoising_strength if work.task != "txt2img" else None,
        "extra_generation_params": {"Schedule type": p.schedule_label}, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": [], "job_timestamp": job_timestamp, "clip_skip": p.clip_skip,
        "is_using_inpainting_conditioning": is_inpainting_model and work.task == "inpaint", "version": version,
    }


def iteration_params(work: Work, k: int) -> GenerationParams:
    """Iteration k of n_iter starts at seed + k * batch_size, as in the web UI."""
    return replace(work.params, seed=work.params.seed + k * work.params.batch_size)
