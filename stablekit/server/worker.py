"""The local backend: one engine, one worker thread, jobs in FIFO order from the SQLite-backed queue.

HTTP handlers only submit, look up and cancel; everything that touches the engine runs here.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from PIL import Image

from .. import __version__
from ..diffusion.common import SamplingStopped
from ..engine import Engine
from ..images import save_png
from ..pipeline.control import Control
from ..pipeline.control_maps import fit_control_map
from .checkpoints import Checkpoint, Checkpoints
from .config import ServerConfig
from .controlnet_api import resolve_models, unit_dict
from .errors import ApiError
from .jobs import CANCELLED, DONE, FAILED, FINISHED, QUEUED, RUNNING, JobQueue, JobRecord, JobStore, LocalQueue, \
    QueueFull, new_job_id
from .metrics import Metrics
from .retention import Retention, prune
from .previews import latent_preview, model_preview
from .webui import Work, info_json, iteration_params, parse_request, to_work

log = logging.getLogger("stablekit.server")
PRUNE_EVERY_S = 60.0  # retention walks the output folders: at most once a minute

EngineLoader = Callable[[str], Engine]


class JobCancelled(Exception):
    """Raised from the step callback when the running job is cancelled: no result is kept."""


class ServerStopping(Exception):
    """Raised from the step callback on shutdown: the job goes back to the queue for the next start."""


@dataclass
class JobResult:
    record: JobRecord
    images: list[Image.Image]


@dataclass
class Progress:
    """What the running job is doing, for /sdapi/v1/progress and the job API's events."""

    job_id: str | None = None
    task: str = ""
    job_no: int = 0  # iteration of n_iter
    job_count: int = 0
    step: int = 0
    steps: int = 0
    started: float = 0.0
    latent: torch.Tensor | None = None  # the first picture's x0 estimate [4, h, w]
    interrupted: bool = False
    skipped: bool = False
    cancelled: bool = False
    stopping: bool = False  # the server shuts down: leave the job for the next start
    textinfo: str = ""
    timestamp: str = "0"

    def fraction(self) -> float:
        """The web UI's formula: 0.01 + job_no/job_count + step/steps/job_count."""
        if not self.job_count:
            return 0.0
        value = 0.01 + self.job_no / self.job_count
        if self.steps:
            value += self.step / self.steps / self.job_count
        return min(value, 1.0)


@dataclass
class Options:
    checkpoint: Checkpoint
    clip_skip: int = 1
    vae: str = "Automatic"  # sd_vae: a file of --vae-dir, or the checkpoint's own
    extra: dict[str, Any] = field(default_factory=dict)


T = TypeVar("T")


class LocalBackend:
    """Submit / get / cancel / interrupt / skip; one worker thread runs the jobs on one engine."""

    def __init__(self, config: ServerConfig, loader: EngineLoader, queue: JobQueue | None = None):
        self.config = config
        self.loader = loader
        self.store = JobStore(config.db_path)
        self.queue = queue or LocalQueue(config.limits.queue_size)
        self.checkpoints = Checkpoints(config.model, config.models_dir)
        self.options = Options(self.checkpoints.default())
        self.progress = Progress()
        self.metrics = Metrics()
        self.retention = Retention(config.keep_results_days, config.max_results_bytes)
        self._pruned = 0.0  # when retention last ran
        self._engine: Engine | None = None
        self._engine_title: str | None = None
        self._engine_lock = threading.Lock()  # held while a job runs or a model loads
        self._lock = threading.Lock()  # job state transitions, futures, pending work
        self._futures: dict[str, Future[JobResult]] = {}
        self._work: dict[str, Work] = {}  # validated work of queued jobs submitted in this process
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stablekit-worker", daemon=True)

    @property
    def has_upscaler(self) -> bool:
        """Whether an SD x4 upscaler model is configured (hires upscaler "SD x4", extras)."""
        return self.config.upscaler_model is not None

    # --- life cycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Load the start-up model, re-queue what a previous run left unfinished, start the worker (once)."""
        if self._thread.is_alive():
            return
        self._load(self.options.checkpoint)
        self.prune()
        for rec in self.store.recover():
            self.queue.put(rec.id, force=True)  # accepted before the restart: never refused now
            log.info("re-queued job %s left unfinished by the previous run", rec.id)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step; the running job is put back as queued (a shutdown is not its fault)."""
        self._stop.set()
        self.progress.stopping = True
        self._thread.join(timeout=10)

    # --- models ---------------------------------------------------------------------------------
    def _load(self, checkpoint: Checkpoint) -> Engine:
        if self._engine is None or self._engine_title != checkpoint.title:
            spec = self.config.model if checkpoint.title == self.checkpoints.default().title else checkpoint.filename
            try:
                engine = self.loader(spec)
            except (ValueError, OSError) as e:
                raise ApiError(400, f"cannot load {checkpoint.title}: {e}") from None
            self._engine, self._engine_title = engine, checkpoint.title  # the old one is freed here
        return self._engine

    def set_vae(self, name: str) -> None:
        """Switch the VAE now (waits for the running job), as POST /options sd_vae does."""
        with self._engine_lock:
            self.engine.addons.use_vae(name)
        self.options.vae = name

    def set_checkpoint(self, name: str) -> Checkpoint:
        """Switch the current model now (waits for the running job), as POST /options does."""
        checkpoint = self.checkpoints.find(name)
        with self._engine_lock:
            self._load(checkpoint)
        self.options.checkpoint = checkpoint
        return checkpoint

    @property
    def resolution(self) -> int | None:
        """The loaded model's own picture size (the browser UI's default width and height)."""
        return self._engine.config.resolution if self._engine is not None else None

    def preview(self, latent: torch.Tensor) -> Image.Image:
        """A cheap picture of a latent, in the loaded model's latent format."""
        if self._engine is None:
            return latent_preview(latent)
        return model_preview(latent, self._engine.loaded.model, self._engine.config.vae)

    @property
    def engine(self) -> Engine:
        assert self._engine is not None
        return self._engine

    def run_exclusive(self, fn: Callable[[Engine], T]) -> T:
        """fn(engine) while no job runs: short work on the loaded model outside the queue (depth maps)."""
        with self._engine_lock:
            return fn(self.engine)

    # --- jobs -----------------------------------------------------------------------------------
    def submit(self, kind: str, task: str, body: dict[str, Any], persist: bool = True) -> tuple[JobRecord, Future[JobResult]]:
        """Validate, record and queue a job. 4xx for bad input, 503 when the queue is full."""
        req = parse_request(task, body)
        work = to_work(task, req, self.config.limits, self.config.allow_url_images, self.options.clip_skip)
        if work.checkpoint is not None:
            work.checkpoint = self.checkpoints.find(work.checkpoint).title
        if work.vae not in (None, "Automatic", "None") and work.vae not in self.engine.addons.vae_files():
            raise ApiError(400, f"unknown VAE {work.vae!r}; GET /sdapi/v1/sd-vae lists them")
        work.controls = resolve_models(work.controls, self.config.controlnet_dir)
        stored = req.model_dump(exclude_unset=True)
        stored["seed"] = work.params.seed  # a re-run after a restart repeats the same pictures
        stored["override_settings"] = {**(req.override_settings or {}), "CLIP_stop_at_last_layers": work.params.clip_skip}
        for key, picture in (("init_images", work.image), ("mask", work.mask)):
            if key in stored and kind == "webui":
                stored[key] = None  # never re-run (its client is gone after a restart): no need to keep it
            elif key in stored and picture is not None:
                from .previews import png_base64  # a URL is fetched once; the stored copy is the picture

                stored[key] = [png_base64(picture)] if key == "init_images" else png_base64(picture)
        if "alwayson_scripts" in stored:  # as the pictures: dropped for web-UI calls, fetched URLs kept as PNGs
            units = [unit_dict(u, Path(u.model).stem) for u in work.controls] if kind != "webui" else []
            stored["alwayson_scripts"] = {"controlnet": {"args": units}} if units else {}
        rec = JobRecord(new_job_id(), kind, task, stored, persist=persist)
        future: Future[JobResult] = Future()
        with self._lock:
            if len(self.queue) >= self.config.limits.queue_size:
                raise ApiError(503, f"the queue is full ({self.config.limits.queue_size} jobs waiting); retry later",
                               headers={"Retry-After": str(self._retry_after())})
            self.store.add(rec)  # written before it is queued: an accepted job survives a crash
            self._futures[rec.id], self._work[rec.id] = future, work
            try:
                self.queue.put(rec.id)
            except QueueFull:  # another backend's queue may fill up between the check and the put
                self.store.update(rec.id, status=FAILED, error="queue full", finished=time.time())
                self._futures.pop(rec.id, None), self._work.pop(rec.id, None)
                raise ApiError(503, "the queue is full; retry later", headers={"Retry-After": "5"}) from None
        return rec, future

    def _retry_after(self) -> int:
        return max(1, min(60, len(self.queue)))  # a rough hint: about one second per waiting job

    def get(self, job_id: str) -> JobRecord | None:
        return self.store.get(job_id)

    def position(self, job_id: str) -> int | None:
        return self.queue.position(job_id)

    def cancel(self, job_id: str) -> JobRecord:
        with self._lock:
            rec = self.store.get(job_id)
            if rec is None:
                raise ApiError(404, f"no job {job_id}")
            if rec.status == QUEUED and self.queue.remove(job_id):
                self._finish(rec, CANCELLED, error="cancelled before it started")
            elif rec.status == RUNNING and self.progress.job_id == job_id:
                self.progress.cancelled = True  # the step callback stops it
            elif rec.status in FINISHED:
                raise ApiError(409, f"job {job_id} has already finished ({rec.status})")
        return self.store.get(job_id) or rec

    def interrupt(self) -> None:
        self.progress.interrupted = self.progress.job_id is not None

    def skip(self) -> None:
        self.progress.skipped = self.progress.job_id is not None

    def _finish(self, rec: JobRecord, status: str, *, error: str | None = None, info: dict | None = None,
                images: list[str] | None = None, pictures: list[Image.Image] | None = None,
                exc: Exception | None = None) -> None:
        """Record the outcome and wake a waiting /sdapi request (`exc`: what it should answer with)."""
        self.store.update(rec.id, status=status, error=error, info=info, images=images or [], finished=time.time())
        final = self.store.get(rec.id) or rec
        self.metrics.job_finished(final, status, len(pictures or []))
        self._work.pop(rec.id, None)
        future = self._futures.pop(rec.id, None)
        if future is not None and not future.done():
            if status == DONE:
                future.set_result(JobResult(final, pictures or []))
            else:
                future.set_exception(exc or ApiError(409 if status == CANCELLED else 500, error or status,
                                                     name="JobCancelled" if status == CANCELLED else "JobFailed"))

    # --- the worker -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            job_id = self.queue.get(timeout=0.5)
            if job_id is None:
                continue
            with self._lock:
                rec = self.store.get(job_id)
                if rec is None or rec.status != QUEUED:
                    continue
                self.store.update(job_id, status=RUNNING, started=time.time(), attempts=rec.attempts + 1)
                self.progress = Progress(job_id=job_id, task=rec.task, started=time.time(),
                                         timestamp=time.strftime("%Y%m%d%H%M%S"))
                work = self._work.get(job_id)
            try:
                self._run(rec, work)
            except JobCancelled:
                with self._lock:
                    self._finish(rec, CANCELLED, error="cancelled while running")
            except ServerStopping:
                self.store.update(job_id, status=QUEUED, attempts=rec.attempts)
                future = self._futures.pop(job_id, None)
                if future is not None and not future.done():
                    future.set_exception(ApiError(503, "the server is shutting down; the job will run after it "
                                                       "restarts", headers={"Retry-After": "10"}))
            except (ApiError, ValueError) as e:  # the request could not be done: a 4xx for its client
                with self._lock:
                    self._finish(rec, FAILED, error=str(e), exc=e)
            except Exception as e:  # keep serving; the job says what went wrong in one line
                log.exception("job %s failed", job_id)
                with self._lock:
                    self._finish(rec, FAILED, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
            finally:
                self.progress = Progress()
            if time.monotonic() - self._pruned > PRUNE_EVERY_S:
                self.prune()

    def prune(self) -> list[str]:
        """Apply the retention limits (finished jobs only); logs what it removed."""
        self._pruned = time.monotonic()
        removed = prune(self.store, self.config.outputs, self.retention)
        if removed:
            log.info("retention: removed %d finished job(s), oldest %s", len(removed), removed[0])
        return removed

    def _callback(self, progress: Progress) -> Callable[[int, int, torch.Tensor], None]:
        def on_step(i: int, n: int, x0: torch.Tensor) -> None:
            self.metrics.step(first=progress.step == 0)
            progress.step, progress.steps, progress.latent = i + 1, n, x0[0].detach()
            if progress.stopping:
                raise ServerStopping()
            if progress.cancelled:
                raise JobCancelled()
            if progress.interrupted or progress.skipped:
                raise SamplingStopped()
        return on_step

    def _run(self, rec: JobRecord, work: Work | None) -> None:
        if work is None:  # re-queued after a restart: validate the stored request again
            req = parse_request(rec.task, rec.request)
            work = to_work(rec.task, req, self.config.limits, self.config.allow_url_images, self.options.clip_skip)
            work.controls = resolve_models(work.controls, self.config.controlnet_dir)
        progress = self.progress
        progress.job_count = work.n_iter
        restore = rec.request.get("override_settings_restore_afterwards", True) is not False
        pictures: list[Image.Image] = []
        with self._engine_lock:
            checkpoint = self.checkpoints.find(work.checkpoint) if work.checkpoint else self.options.checkpoint
            engine = self._load(checkpoint)
            engine.addons.use_vae(work.vae or self.options.vae)
            if not restore:
                self.options.checkpoint = checkpoint
                self.options.vae = work.vae or self.options.vae
            callback = self._callback(progress)
            controls = engine.prepare_controls(work.task, work.params, work.controls, **work.inputs)  # once
            for k in range(work.n_iter):
                if progress.interrupted:
                    break
                progress.job_no, progress.step, progress.skipped = k, 0, False
                pictures += engine.run(work.task, iteration_params(work, k), callback=callback,
                                       controls=controls, **work.inputs)
            pictures += self._detected_maps(work, controls)
        infotexts = [im.info.get("parameters", "") for im in pictures]
        model = engine.loaded
        info = info_json(work, infotexts, Path(model.name).stem, model.short_hash, progress.timestamp,
                         engine.config.inputs == "inpaint", f"stablekit {__version__}")
        names = []
        if rec.persist:
            folder = self.config.outputs / rec.id  # the id is ours: no client string in any path
            names = [save_png(im, folder, work.params.seed + i).name for i, im in enumerate(pictures)]
        with self._lock:
            self._finish(rec, DONE, info=info, images=names, pictures=pictures)

    @staticmethod
    def _detected_maps(work: Work, controls: tuple[Control, ...]) -> list[Image.Image]:
        """The maps the ControlNet units saw (at the working size), after the pictures, as the extension
        returns them; a unit's save_detected_map false leaves its map out."""
        p = work.params
        return [Image.fromarray(fit_control_map(c.detected, p.width, p.height, c.unit.resize))
                for c, wanted in zip(controls, work.control_maps) if wanted]

    def image_path(self, rec: JobRecord, index: int) -> Path | None:
        if not 0 <= index < len(rec.images):
            return None
        return self.config.outputs / rec.id / rec.images[index]
