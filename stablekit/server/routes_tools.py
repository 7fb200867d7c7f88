"""Picture tools outside the job queue: a picture's depth map (POST /api/v1/depth) and the web UI's
extras upscaling (POST /sdapi/v1/extra-single-image: Lanczos, Nearest, or the SD x4 upscaler).

Both run on the loaded model's thread lock (`Backend.run_exclusive`), between jobs.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch.nn.functional as F
from fastapi import APIRouter, Depends
from PIL import Image

from ..engine import Engine
from ..images import to_pil, to_tensor
from ..pipeline.depth import depth_picture
from .api_models import DepthRequest, ExtrasSingleImageRequest
from .errors import ApiError
from .previews import png_base64
from .uploads import decode_picture
from .worker import Backend

EXTRAS_UPSCALERS = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS,
                    "Nearest": Image.Resampling.NEAREST, "SD x4": None}


def tools_router(backend: Backend, auth: Any) -> APIRouter:
    router = APIRouter(dependencies=[Depends(auth)], tags=["tools"])

    @router.post("/api/v1/depth")
    async def depth(req: DepthRequest) -> dict[str, Any]:
        """The loaded depth model's estimate for a picture, at its size: a 16-bit grey PNG (base64),
        min-max normalised, larger = nearer; send it back as depth2img's depth_map, edited or not."""
        limits = backend.config.limits
        image = decode_picture(req.image, limits, backend.config.allow_url_images, "image")

        def estimate(engine: Engine) -> Image.Image:
            if engine.config.inputs != "depth":
                raise ApiError(400, f"the loaded model is {engine.config.kind.what}; depth maps need a depth model")
            d = engine.estimate_depth(image)
            return depth_picture(F.interpolate(d, size=(image.height, image.width), mode="bicubic",
                                               align_corners=False)[0])

        return {"image": png_base64(await asyncio.to_thread(backend.run_exclusive, estimate))}

    @router.post("/sdapi/v1/extra-single-image")
    async def extra_single_image(req: ExtrasSingleImageRequest) -> dict[str, Any]:
        """Upscale one picture by upscaling_resize, or to cover upscaling_resize_w x h (cropped to it with
        upscaling_crop, else stretched), with upscaler_1. Runs between jobs, on the engine's lock."""
        limits = backend.config.limits
        image = decode_picture(req.image, limits, backend.config.allow_url_images, "image")
        name = req.upscaler_1 or "None"
        if name not in EXTRAS_UPSCALERS or (name == "SD x4" and not backend.has_upscaler):
            known = [n for n in EXTRAS_UPSCALERS if n != "SD x4" or backend.has_upscaler]
            raise ApiError(400, f"unknown upscaler {name!r}; choose from {', '.join(known)}")
        for other in ("gfpgan_visibility", "codeformer_visibility", "extras_upscaler_2_visibility"):
            if getattr(req, other):
                raise ApiError(400, f"{other} is not supported by this server")
        if req.resize_mode not in (0, 1):
            raise ApiError(400, f"resize_mode must be 0 (by upscaling_resize) or 1 (to a size), got {req.resize_mode}")
        if req.resize_mode == 1:
            w, h = req.upscaling_resize_w, req.upscaling_resize_h
            if not (isinstance(w, int) and isinstance(h, int) and w >= 1 and h >= 1):
                raise ApiError(400, f"upscaling_resize_w and upscaling_resize_h must be whole numbers >= 1, got {w}, {h}")
            scale = max(w / image.width, h / image.height)  # the web UI: cover the box, then crop its middle
            size, box = (w, h), (w, h) if req.upscaling_crop else None
        else:
            scale = float(req.upscaling_resize or 1)
            size, box = (int(image.width * scale), int(image.height * scale)), None
        if not 1 <= scale <= 8:
            raise ApiError(400, f"the upscale factor must be from 1 to 8, got {scale:g}")
        enlarged = (max(size[0], round(image.width * scale)), max(size[1], round(image.height * scale)))
        work = [enlarged] + ([(4 * image.width, 4 * image.height)] if name == "SD x4" else [])
        for w, h in work:
            if w * h > limits.max_pixels:
                raise ApiError(400, f"{w}x{h} is over this server's limit of {limits.max_pixels} pixels")

        def upscale(engine: Engine) -> Image.Image:
            big = image
            if name == "SD x4":
                big = to_pil(engine.upscaler.upscale_pictures(to_tensor(image)))[0]
            resample = EXTRAS_UPSCALERS[name] or Image.Resampling.LANCZOS
            big = big if big.size == enlarged else big.resize(enlarged, resample)
            if box is None:
                return big if big.size == size else big.resize(size, Image.Resampling.LANCZOS)
            left, top = (big.width - box[0]) // 2, (big.height - box[1]) // 2
            return big.crop((left, top, left + box[0], top + box[1]))

        out = await asyncio.to_thread(backend.run_exclusive, upscale)
        return {"html_info": "", "image": png_base64(out)}

    return router
