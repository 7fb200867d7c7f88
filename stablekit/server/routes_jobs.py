"""`/api/v1/jobs`: stablekit's own job API for long work (and for the browser UI to come).

- POST   /api/v1/jobs                    {"task": "txt2img"|"img2img"|"inpaint", ...web-UI fields} -> 202 {id, status, links}
- GET    /api/v1/jobs?limit=50           recent jobs, newest first
- GET    /api/v1/jobs/{id}               status, queue position, live progress, results (info, image links), error
- GET    /api/v1/jobs/{id}/images/{n}    the n-th picture (PNG with its infotext)
- GET    /api/v1/jobs/{id}/events        server-sent events: `status`, `progress`, `preview`, then one final
                                          `done` / `failed` / `cancelled` carrying the job, and the stream ends
- DELETE /api/v1/jobs/{id}               cancel a queued or running job (409 once it has finished)
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from .errors import ApiError
from .jobs import FINISHED, RUNNING, JobRecord, valid_job_id
from .previews import png_base64
from .worker import Backend

POLL_S = 0.2  # how often the event stream looks at the job
HEARTBEAT_S = 15.0  # a comment line keeps proxies from closing an idle stream


def job_json(backend: Backend, rec: JobRecord) -> dict[str, Any]:
    base = f"/api/v1/jobs/{rec.id}"
    p = backend.progress_of(rec.id)
    live = None
    if rec.status == RUNNING and p is not None:
        live = {"fraction": p.fraction(), "step": p.step, "steps": p.steps, "job_no": p.job_no, "job_count": p.job_count}
        if p.worker:
            live["worker"] = p.worker
    params = {k: v for k, v in rec.request.items() if k not in ("init_images", "mask")}
    return {
        "id": rec.id, "kind": rec.kind, "task": rec.task, "status": rec.status,
        "position": backend.position(rec.id), "created": rec.created, "started": rec.started,
        "finished": rec.finished, "attempts": rec.attempts, "progress": live, "error": rec.error,
        "images": [f"{base}/images/{i}" for i in range(len(rec.images))], "info": rec.info, "parameters": params,
        "links": {"self": base, "events": f"{base}/events"},
    }


def jobs_router(backend: Backend, auth: Any) -> APIRouter:
    router = APIRouter(prefix="/api/v1/jobs", dependencies=[Depends(auth)], tags=["job API"])

    def record(job_id: str) -> JobRecord:
        rec = backend.get(job_id) if valid_job_id(job_id) else None
        if rec is None:
            raise ApiError(404, f"no job {job_id[:64]!r}")
        return rec

    @router.post("", status_code=202)
    async def create(body: dict[str, Any] = Body(..., examples=[{"task": "txt2img", "prompt": "a lighthouse",
                                                                  "steps": 20, "seed": 1}])) -> JSONResponse:
        """Queue a job and return its id at once. `task` is txt2img (default), img2img (with `mask`: inpaint)
        or inpaint; the other fields are those of /sdapi/v1/txt2img or /sdapi/v1/img2img."""
        task = body.pop("task", "img2img" if body.get("init_images") else "txt2img")
        rec, _ = await asyncio.to_thread(backend.submit, "job", task, body, True)
        out = job_json(backend, backend.get(rec.id) or rec)
        return JSONResponse(out, status_code=202, headers={"Location": out["links"]["self"]})

    @router.get("")
    def list_jobs(limit: int = 50) -> list[dict[str, Any]]:
        return [job_json(backend, r) for r in backend.store.list(max(1, min(limit, 500)), kind="job")]

    @router.get("/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        return job_json(backend, record(job_id))

    @router.delete("/{job_id}")
    def cancel(job_id: str) -> dict[str, Any]:
        record(job_id)
        return job_json(backend, backend.cancel(job_id))

    @router.get("/{job_id}/images/{index}")
    def image(job_id: str, index: int) -> FileResponse:
        rec = record(job_id)
        path = backend.image_path(rec, index)
        if path is None or not path.is_file():
            raise ApiError(404, f"job {job_id} has no picture {index}")
        return FileResponse(path, media_type="image/png")

    @router.get("/{job_id}/events")
    async def events(job_id: str, request: Request, previews: bool = True) -> StreamingResponse:
        record(job_id)
        return StreamingResponse(_stream(backend, job_id, request, previews), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router


def _event(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def _stream(backend: Backend, job_id: str, request: Request, previews: bool) -> AsyncIterator[str]:
    """Poll the job and send what changed; ends with the final state (bounded by the job's life)."""
    last_status, last_step, idle = None, None, 0.0
    while not await request.is_disconnected():
        rec = backend.get(job_id)
        if rec is None:
            return
        if rec.status != last_status:
            last_status = rec.status
            yield _event("status", {"id": job_id, "status": rec.status, "position": backend.position(job_id)})
        if rec.status in FINISHED:
            yield _event(rec.status, job_json(backend, rec))
            return
        p = backend.progress_of(job_id)
        if p is not None and (p.job_no, p.step) != last_step and p.steps:
            last_step = (p.job_no, p.step)
            yield _event("progress", {"id": job_id, "fraction": p.fraction(), "step": p.step, "steps": p.steps,
                                      "job_no": p.job_no, "job_count": p.job_count})
            latent = p.latent
            if previews and latent is not None:
                yield _event("preview", {"id": job_id, "step": p.step,
                                         "image": "data:image/png;base64," + png_base64(backend.preview(latent))})
            idle = 0.0
        await asyncio.sleep(POLL_S)
        idle += POLL_S
        if idle >= HEARTBEAT_S:
            idle = 0.0
            yield ": keep-alive\n\n"
