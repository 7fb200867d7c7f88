"""`/sdapi/v1/*`: the web UI's API, as a thin adapter over the backend.

Generation requests become jobs in the same FIFO queue as the job API; the handler waits for
its job and answers in the web UI's response shape.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, Body, Depends

from ..addons.session import lora_files, vae_files
from ..diffusion.samplers import SAMPLERS
from ..diffusion.schedule_names import SCHEDULE_LABELS
from ..images import parse_infotext
from ..params import HIRES_UPSCALERS
from ..pipeline.hires import LATENT_MODES
from .api_models import (GenerationResponse, Img2ImgRequest, PNGInfoRequest, PNGInfoResponse, ProgressResponse,
                         ProgressState, SamplerItem, SchedulerItem, SDModelItem, Txt2ImgRequest)
from .errors import ApiError
from .previews import png_base64
from .uploads import decode_picture
from .webui import echo
from .worker import Backend


def sdapi_router(backend: Backend, auth: Any) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", dependencies=[Depends(auth)], tags=["web UI API"])

    async def generate(task: str, req: Txt2ImgRequest | Img2ImgRequest) -> dict[str, Any]:
        body = req.model_dump(exclude_unset=True)
        # submit validates and may decode pictures or load nothing heavy; run it off the event loop
        rec, future = await asyncio.to_thread(backend.submit, "webui", task, body, bool(req.save_images))
        result = await asyncio.wrap_future(future)
        images = [png_base64(im, im.info.get("parameters")) for im in result.images] if req.send_images is not False else []
        return {"images": images, "parameters": echo(req), "info": json.dumps(result.record.info)}

    @router.post("/txt2img", response_model=GenerationResponse)
    async def txt2img(req: Txt2ImgRequest) -> dict[str, Any]:
        """Text to picture; fields, defaults and response as the web UI's API."""
        return await generate("txt2img", req)

    @router.post("/img2img", response_model=GenerationResponse)
    async def img2img(req: Img2ImgRequest) -> dict[str, Any]:
        """Picture to picture; with `mask`, inpainting (inpaint_full_res defaults to true, as in the API)."""
        return await generate("img2img", req)

    @router.get("/progress", response_model=ProgressResponse)
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        """The running job's progress, an ETA relative to now, and a cheap preview of the current step."""
        p = backend.progress
        state = ProgressState(skipped=p.skipped, interrupted=p.interrupted, stopping_generation=p.cancelled,
                              job=p.job_id or "", job_count=p.job_count if p.job_id else 0,
                              job_timestamp=p.timestamp, job_no=p.job_no, sampling_step=p.step, sampling_steps=p.steps)
        if not p.job_id or not p.job_count:
            return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": None}
        fraction = p.fraction()
        elapsed = time.time() - p.started
        eta = elapsed / fraction - elapsed if fraction > 0 else 0
        latent = p.latent
        image = None if skip_current_image or latent is None else png_base64(backend.preview(latent))
        return {"progress": fraction, "eta_relative": eta, "state": state, "current_image": image,
                "textinfo": p.textinfo or None, "current_task": p.job_id}

    @router.post("/interrupt")
    def interrupt() -> dict[str, Any]:
        """Stop the running job after its current step; its pictures so far are returned (as there)."""
        backend.interrupt()
        return {}

    @router.post("/skip")
    def skip() -> dict[str, Any]:
        """Stop the current batch of the running job after its current step; later n_iter batches still run."""
        backend.skip()
        return {}

    @router.get("/sd-models", response_model=list[SDModelItem])
    def sd_models() -> list[dict[str, Any]]:
        return [{"title": c.title, "model_name": c.model_name, "hash": c.hash, "sha256": c.sha256,
                 "filename": c.filename, "config": None} for c in backend.checkpoints.list()]

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints() -> dict[str, Any]:
        backend.checkpoints.list()  # the folder is scanned on every listing anyway
        return {}

    @router.get("/samplers", response_model=list[SamplerItem])
    def samplers() -> list[dict[str, Any]]:
        return [{"name": s.name, "aliases": list(s.aliases), "options": {o: "" for o in s.options}} for s in SAMPLERS]

    @router.get("/schedulers", response_model=list[SchedulerItem])
    def schedulers() -> list[dict[str, Any]]:
        rho = {"karras": 7.0, "polyexponential": 1.0}
        return [{"name": k, "label": v, "aliases": None, "default_rho": rho.get(k, -1), "need_inner_model": False}
                for k, v in SCHEDULE_LABELS.items()]

    @router.get("/options")
    def get_options() -> dict[str, Any]:
        o = backend.options
        return {"sd_model_checkpoint": o.checkpoint.title, "sd_checkpoint_hash": o.checkpoint.sha256,
                "CLIP_stop_at_last_layers": o.clip_skip, "samples_format": "png", "sd_vae": o.vae,
                "eta_noise_seed_delta": 0, "randn_source": "CPU", "inpainting_mask_weight": 1.0,
                "img2img_color_correction": False, "img2img_background_color": "#ffffff",
                "stablekit_model_resolution": backend.resolution, **o.extra}  # ours: the model's own size

    @router.post("/options")
    def set_options(body: dict[str, Any] = Body(...)) -> None:
        """Sets sd_model_checkpoint (loads it now), sd_vae and CLIP_stop_at_last_layers; other keys are ignored."""
        if "CLIP_stop_at_last_layers" in body:
            clip = body["CLIP_stop_at_last_layers"]
            if not isinstance(clip, int) or isinstance(clip, bool) or not 1 <= clip <= 12:
                raise ApiError(400, f"CLIP_stop_at_last_layers must be a whole number from 1 to 12, got {clip!r}")
        if "sd_model_checkpoint" in body:
            name = body["sd_model_checkpoint"]
            if not isinstance(name, str):
                raise ApiError(400, "sd_model_checkpoint must be a string")
            backend.set_checkpoint(name)
        if "sd_vae" in body:
            if not isinstance(body["sd_vae"], str):
                raise ApiError(400, "sd_vae must be a string")
            backend.set_vae(body["sd_vae"])
        if "CLIP_stop_at_last_layers" in body:
            backend.options.clip_skip = body["CLIP_stop_at_last_layers"]
        return None

    @router.get("/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        c = backend.config
        return {"api": True, "nowebui": True, "ckpt": c.model, "ckpt_dir": str(c.models_dir) if c.models_dir else None,
                "api_auth": None, "cors_allow_origins": ",".join(c.cors_origins) or None}

    @router.get("/loras")
    def loras() -> list[dict[str, Any]]:
        """The LoRA folder's files, as the web UI's Lora extension lists them."""
        folder = backend.config.lora_dir
        return [{"name": name, "alias": name, "path": str(path.relative_to(folder)), "metadata": {}}
                for name, path in lora_files(folder).items()]  # paths relative to the folder: no server paths

    @router.get("/embeddings")
    def embeddings() -> dict[str, Any]:
        """Loaded textual-inversion embeddings, in the web UI's shape."""
        loaded = {name: {"step": e.step, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": e.dim,
                         "vectors": e.num_vectors} for name, e in backend.embeddings.items()}
        return {"loaded": loaded, "skipped": {}}

    @router.get("/sd-vae")
    def sd_vae() -> list[dict[str, Any]]:
        """The VAE folder's files (sd_vae values; "Automatic" is the checkpoint's own), names relative to it."""
        return [{"model_name": path.stem, "filename": name} for name, path in vae_files(backend.config.vae_dir).items()]

    @router.get("/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        """The picture upscalers hires fix (hr_upscaler) takes, in the web UI's shape; the latent ones are
        under /latent-upscale-modes."""
        names = [n for n in HIRES_UPSCALERS if n not in LATENT_MODES and (n != "x4" or backend.has_upscaler)]
        return [{"name": HIRES_UPSCALERS[n], "model_name": None, "model_path": None, "model_url": None,
                 "scale": 4 if n == "x4" else None} for n in names]

    @router.get("/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, str]]:
        return [{"name": HIRES_UPSCALERS[n]} for n in LATENT_MODES]

    @router.get("/scripts")
    def scripts() -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}  # no extension scripts

    @router.post("/png-info", response_model=PNGInfoResponse)
    def png_info(req: PNGInfoRequest) -> dict[str, Any]:
        """The infotext and other text chunks of a PNG, and the infotext parsed into fields."""
        limits = backend.config.limits
        image = decode_picture(req.image, limits, allow_urls=False, what="image", mode=None)
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        info = items.pop("parameters", "")
        return {"info": info, "items": items, "parameters": parse_infotext(info) if info else {}}

    @router.get("/memory")
    def memory() -> dict[str, Any]:
        return {"ram": _ram(), "cuda": _cuda()}

    return router


def _ram() -> dict[str, Any]:
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines() if ":" in line)
        kb = {k: int(v.split()[0]) * 1024 for k, v in fields.items() if v.split()}
        total, free = kb["MemTotal"], kb.get("MemAvailable", kb.get("MemFree", 0))
        return {"free": free, "used": total - free, "total": total}
    except (OSError, KeyError, ValueError) as e:
        return {"error": f"unavailable ({e})"}


def _cuda() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"error": "unavailable"}
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()
    return {"system": {"free": free, "used": total - free, "total": total},
            "active": {"current": stats.get("active_bytes.all.current", 0), "peak": stats.get("active_bytes.all.peak", 0)}}
