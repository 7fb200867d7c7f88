"""The ControlNet extension's API: `alwayson_scripts.controlnet.args` units on txt2img / img2img, and
GET /controlnet/{version,model_list,module_list,settings}, POST /controlnet/detect, as its clients
(webuiapi's ControlNet helpers, editor plug-ins, bots) send and read them.

A unit is one dict with the extension's field names and defaults (`enabled` False: send true): image
(base64; also {"image", "mask"} or [image, mask]; empty: the task's init image), module, model
("name" or "name [hash]" from /controlnet/model_list), weight (0..2), resize_mode ("Just Resize",
"Crop and Resize", "Resize and Fill", their old names, or 0..2), processor_res, threshold_a/b (-1:
the module's default), guidance_start, guidance_end, pixel_perfect, control_mode ("Balanced", "My prompt
is more important", "ControlNet is more important", or 0..2), hr_option ("Both", "Low res only", "High
res only"), save_detected_map (the maps follow the pictures in the response, as there). Aliases:
input_image, guidance (= guidance_end), lowvram, mask_image. Refused with 400: masks, advanced_weighting,
effective_region_mask, several pictures in one unit, unknown modules or models, more units than the
server allows.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Body, Depends
from PIL import Image

from ..addons.controlnet_files import controlnet_labels, find_controlnet
from ..detect import CheckpointError
from ..engine import Engine
from ..pipeline.control import CONTROL_MODES, CONTROL_RESIZE, HR_OPTIONS, ControlUnit
from ..pipeline.control_maps import PREPROCESSORS
from .config import Limits
from .errors import ApiError
from .previews import png_base64
from .uploads import decode_picture

API_VERSION = 3  # the extension's get_api_version()
RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Outer Fit (Shrink to Fit)": "Resize and Fill",
                  "Scale to Fit (Inner Fit)": "Crop and Resize", "Envelope (Outer Fit)": "Resize and Fill"}
FIELD_ALIASES = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram", "mask_image": "mask"}


def _choice(value: Any, labels: dict[str, str], what: str, aliases: dict[str, str] | None = None) -> str:
    """Our name for the extension's label, its 0-based number, or our own name."""
    ours = list(labels)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(ours):
        return ours[value]
    if isinstance(value, str):
        value = (aliases or {}).get(value, value)
        for name, label in labels.items():
            if value in (name, label):
                return name
    raise ApiError(400, f"{what} must be one of {', '.join(map(repr, labels.values()))}, got {value!r}")


def _unit_picture(unit: dict[str, Any], index: int, limits: Limits, allow_urls: bool) -> Image.Image | None:
    image, mask = unit.get("image"), unit.get("mask")
    if isinstance(image, list) and image and isinstance(image[0], dict):
        if len(image) > 1:
            raise ApiError(400, f"ControlNet unit {index}: several pictures in one unit (batch) are not supported")
        image = image[0]
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask", mask)
    elif isinstance(image, list):
        if len(image) != 2:
            raise ApiError(400, f"ControlNet unit {index}: image must be a picture, {{image, mask}} or [image, mask]")
        image, mask = image
    if mask:
        raise ApiError(400, f"ControlNet unit {index}: masks are not supported by this server")
    if not image:
        return None
    return decode_picture(image, limits, allow_urls, f"ControlNet unit {index} image")


def parse_unit(raw: Any, index: int, limits: Limits, allow_urls: bool) -> ControlUnit | None:
    """One unit dict -> a checked ControlUnit, or None when it is not enabled."""
    if not isinstance(raw, dict):
        raise ApiError(400, f"ControlNet unit {index} must be an object with the extension's field names "
                            f"(positional arguments are not supported), got {type(raw).__name__}")
    unit = dict(raw)
    for alias, name in FIELD_ALIASES.items():
        if alias in unit:
            if name in unit:
                raise ApiError(400, f"ControlNet unit {index}: give {name!r} or its alias {alias!r}, not both")
            unit[name] = unit.pop(alias)
    if not unit.get("enabled", False):
        return None
    for name in ("advanced_weighting", "effective_region_mask"):
        if unit.get(name) is not None:
            raise ApiError(400, f"ControlNet unit {index}: {name} is not supported by this server")
    module = unit.get("module") or "none"
    if module not in PREPROCESSORS:
        raise ApiError(400, f"ControlNet unit {index}: unknown module {module!r}; GET /controlnet/module_list lists "
                            "them")
    model = unit.get("model") or "None"
    if model == "None":
        raise ApiError(400, f"ControlNet unit {index} is enabled but names no model")
    try:
        return ControlUnit(
            model, image=_unit_picture(unit, index, limits, allow_urls), weight=float(unit.get("weight", 1.0)),
            start=float(unit.get("guidance_start", 0.0)), end=float(unit.get("guidance_end", 1.0)),
            mode=_choice(unit.get("control_mode", "Balanced"), CONTROL_MODES, "control_mode"),
            resize=_choice(unit.get("resize_mode", "Crop and Resize"), CONTROL_RESIZE, "resize_mode", RESIZE_ALIASES),
            module=module, processor_res=int(unit.get("processor_res", -1)),
            threshold_a=float(unit.get("threshold_a", -1)), threshold_b=float(unit.get("threshold_b", -1)),
            pixel_perfect=bool(unit.get("pixel_perfect", False)),
            hr_option=_choice(unit.get("hr_option", "Both"), HR_OPTIONS, "hr_option"),
        ).validated()
    except (TypeError, ValueError) as e:
        if isinstance(e, ApiError):
            raise
        raise ApiError(400, f"ControlNet unit {index}: {e}") from None


def parse_units(scripts: dict[str, Any] | None, limits: Limits, allow_urls: bool,
                ) -> tuple[tuple[ControlUnit, ...], tuple[bool, ...]]:
    """The enabled units of `alwayson_scripts` (the script title in any case), and for each whether its
    detected map goes back with the pictures."""
    args: list[Any] = []
    for title, script in (scripts or {}).items():
        if title.lower() == "controlnet":
            args = script.get("args", []) if isinstance(script, dict) else script
            if not isinstance(args, list):
                raise ApiError(400, "alwayson_scripts.controlnet.args must be a list of units")
    units, maps = [], []
    for i, raw in enumerate(args):
        unit = parse_unit(raw, i, limits, allow_urls)
        if unit is not None:
            units.append(unit)
            maps.append(bool(raw.get("save_detected_map", True)))
    if len(units) > limits.max_controls:
        raise ApiError(400, f"{len(units)} ControlNet units are over this server's limit of {limits.max_controls}")
    return tuple(units), tuple(maps)


def resolve_models(units: tuple[ControlUnit, ...], folder) -> tuple[ControlUnit, ...]:
    """Each unit's model as a file of the server's ControlNet folder (names only: no client paths)."""
    out = []
    for unit in units:
        try:
            path = find_controlnet(unit.model, folder, allow_paths=False)
        except CheckpointError as e:
            raise ApiError(400, f"{e}; GET /controlnet/model_list lists them") from None
        out.append(replace(unit, model=str(path)))
    return tuple(out)


def unit_dict(unit: ControlUnit, model: str) -> dict[str, Any]:
    """A unit back in the extension's fields, its picture as a PNG (what a stored job re-runs from)."""
    return {"enabled": True, "model": model, "module": unit.module, "weight": unit.weight,
            "image": png_base64(unit.image) if unit.image is not None else None,
            "resize_mode": CONTROL_RESIZE[unit.resize], "processor_res": unit.processor_res,
            "threshold_a": unit.threshold_a, "threshold_b": unit.threshold_b, "guidance_start": unit.start,
            "guidance_end": unit.end, "pixel_perfect": unit.pixel_perfect, "control_mode": CONTROL_MODES[unit.mode],
            "hr_option": HR_OPTIONS[unit.hr_option]}


def module_detail(name: str) -> dict[str, Any]:
    pre = PREPROCESSORS[name]
    sliders = []
    if pre.resolution is not None:
        sliders.append({"name": "Resolution", "value": pre.resolution, "min": 64, "max": 2048, "step": 8})
    for slider in (pre.threshold_a, pre.threshold_b):
        if slider is not None:
            sliders.append({"name": slider.label, "value": slider.default, "min": slider.minimum,
                            "max": slider.maximum, "step": slider.step})
    return {"model_free": name != "depth_midas", "sliders": sliders}


def controlnet_router(backend: Any, auth: Any) -> APIRouter:
    router = APIRouter(dependencies=[Depends(auth)], tags=["controlnet"])

    @router.get("/controlnet/version")
    def version() -> dict[str, int]:
        return {"version": API_VERSION}

    @router.get("/controlnet/settings")
    def controlnet_settings() -> dict[str, int]:
        return {"control_net_unit_count": backend.config.limits.max_controls}

    @router.get("/controlnet/model_list")
    def model_list(update: bool = True) -> dict[str, list[str]]:
        return {"model_list": controlnet_labels(backend.config.controlnet_dir)}

    @router.get("/controlnet/module_list")
    def module_list(alias_names: bool = False) -> dict[str, Any]:
        names = [PREPROCESSORS[n].label if alias_names else n for n in PREPROCESSORS]
        return {"module_list": names, "module_detail": {shown: module_detail(n) for shown, n in zip(names, PREPROCESSORS)}}

    @router.post("/controlnet/detect")
    async def detect(
        controlnet_module: str = Body("none"), controlnet_input_images: list[str] = Body([]),
        controlnet_images: list[str] = Body([]),  # webuiapi's older name for the pictures
        controlnet_processor_res: int = Body(-1), controlnet_threshold_a: float = Body(-1),
        controlnet_threshold_b: float = Body(-1), controlnet_masks: list[str] = Body([]),
        low_vram: bool = Body(False),
    ) -> dict[str, Any]:
        """The module's maps of the pictures, each at the processor resolution, as base64 PNGs."""
        limits = backend.config.limits
        if controlnet_module not in PREPROCESSORS:
            raise ApiError(400, f"unknown module {controlnet_module!r}; GET /controlnet/module_list lists them")
        if controlnet_masks:
            raise ApiError(400, "controlnet_masks are not supported by this server")
        given = controlnet_input_images or controlnet_images
        if not given:
            raise ApiError(400, "no picture given (controlnet_input_images)")
        if len(given) > limits.max_batch:
            raise ApiError(400, f"{len(given)} pictures are over this server's limit of {limits.max_batch}")
        pictures = [decode_picture(p, limits, backend.config.allow_url_images, f"controlnet_input_images[{i}]")
                    for i, p in enumerate(given)]
        try:
            unit = ControlUnit("-", module=controlnet_module, processor_res=controlnet_processor_res,
                               threshold_a=controlnet_threshold_a, threshold_b=controlnet_threshold_b).validated()
        except ValueError as e:
            raise ApiError(400, str(e)) from None

        def run(engine: Engine) -> list[str]:
            return [png_base64(Image.fromarray(engine.control_map(unit, p, p.width, p.height))) for p in pictures]

        return {"images": await asyncio.to_thread(backend.run_exclusive, run), "info": "Success"}

    return router
