"""The backends: jobs in FIFO order from the SQLite-backed queue, run by worker threads.

HTTP handlers only submit, look up and cancel. `Backend` keeps the queue, the records, the waiting
clients and the progress of running jobs; how a job runs is its subclass's: `LocalBackend` runs it on
the engine of this process (one worker), `RayBackend` (server/ray_serve.py) on Ray Serve replicas
(one worker per replica).
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
from ..addons.embeddings import Embedding, read_embeddings_dir
from ..addons.session import vae_files
from ..engine import Engine
from ..images import save_png
from .checkpoints import Checkpoint, Checkpoints
from .config import ServerConfig
from .controlnet_api import resolve_models, unit_dict
from .errors import ApiError
from .jobs import CANCELLED, DONE, FAILED, FINISHED, QUEUED, RUNNING, JobQueue, JobRecord, JobStore, LocalQueue, \
    QueueFull, new_job_id
from .metrics import Metrics
from .previews import latent_preview, model_preview
from .retention import Retention, prune
from .runner import EngineLoader, EngineSlot, Outcome, Progress, run_job
from .webui import Work, info_json, parse_request, to_work

log = logging.getLogger("stablekit.server")
PRUNE_EVERY_S = 60.0  # retention walks the output folders: at most once a minute

__all__ = ["Backend", "EngineLoader", "JobResult", "LocalBackend", "Options", "Progress"]


@dataclass
class JobResult:
    record: JobRecord
    images: list[Image.Image]


@dataclass
class Options:
    checkpoint: Checkpoint
    clip_skip: int = 1
    vae: str = "Automatic"  # sd_vae: a file of --vae-dir, or the checkpoint's own
    extra: dict[str, Any] = field(default_factory=dict)


T = TypeVar("T")


class Backend:
    """Submit / get / cancel / interrupt / skip; `workers` threads hand the queued jobs to `_execute`."""

    def __init__(self, config: ServerConfig, queue: JobQueue | None = None, workers: int = 1):
        self.config = config
        self.store = JobStore(config.db_path)
        self.queue = queue or LocalQueue(config.limits.queue_size)
        self.checkpoints = Checkpoints(config.model, config.models_dir)
        self.options = Options(self.checkpoints.default())
        self.metrics = Metrics()
        self.retention = Retention(config.keep_results_days, config.max_results_bytes)
        self.embeddings: dict[str, Embedding] = {}  # the --embeddings-dir files, read at start
        self._pruned = 0.0  # when retention last ran
        self._lock = threading.Lock()  # job state transitions, futures, pending work, running jobs
        self._futures: dict[str, Future[JobResult]] = {}
        self._work: dict[str, Work] = {}  # validated work of queued jobs submitted in this process
        self._running: dict[str, Progress] = {}  # by job id, in the order they started
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, name=f"stablekit-worker-{i}", daemon=True)
                         for i in range(workers)]

    # --- what a subclass provides -------------------------------------------------------------
    def _prepare(self) -> None:
        """Load the start-up model (called once by start)."""
        raise NotImplementedError

    def _execute(self, rec: JobRecord, work: Work, checkpoint: Checkpoint, vae: str, progress: Progress) -> Outcome:
        raise NotImplementedError

    def _use(self, checkpoint: Checkpoint, vae: str) -> None:
        """Make `checkpoint` with `vae` the current model now (a bad one is a 400 here, not at the next job)."""
        raise NotImplementedError

    def _signal(self, progress: Progress) -> None:
        """A flag of a running job was set (interrupt, skip, cancel, stop): pass it on where it runs."""

    def run_exclusive(self, fn: Callable[[Engine], T]) -> T:
        """fn(engine) on the current model while no job runs there: short work outside the queue (depth maps)."""
        raise NotImplementedError

    def preview(self, latent: torch.Tensor) -> Image.Image:
        """A cheap picture of a latent, in the current model's latent format."""
        raise NotImplementedError

    @property
    def resolution(self) -> int | None:
        """The current model's own picture size (the browser UI's default width and height)."""
        raise NotImplementedError

    # --- life cycle -----------------------------------------------------------------------------
    @property
    def has_upscaler(self) -> bool:
        """Whether an SD x4 upscaler model is configured (hires upscaler "SD x4", extras)."""
        return self.config.upscaler_model is not None

    def start(self) -> None:
        """Load the start-up model, re-queue what a previous run left unfinished, start the workers (once)."""
        if self._threads[0].is_alive():
            return
        self._prepare()
        if self.config.embeddings_dir is not None:
            self.embeddings = read_embeddings_dir(self.config.embeddings_dir)
        self.prune()
        for rec in self.store.recover():
            self.queue.put(rec.id, force=True)  # accepted before the restart: never refused now
            log.info("re-queued job %s left unfinished by the previous run", rec.id)
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop after the current steps; running jobs are put back as queued (a shutdown is not their fault)."""
        self._stop.set()
        with self._lock:
            running = list(self._running.values())
        for progress in running:
            progress.stopping = True
            self._signal(progress)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=10)

    # --- models ---------------------------------------------------------------------------------
    def set_checkpoint(self, name: str) -> Checkpoint:
        """Switch the current model now (waits for a running job), as POST /options does."""
        checkpoint = self.checkpoints.find(name)
        self._use(checkpoint, self.options.vae)
        self.options.checkpoint = checkpoint
        return checkpoint

    def set_vae(self, name: str) -> None:
        """Switch the VAE now (waits for a running job), as POST /options sd_vae does."""
        self._check_vae(name)
        self._use(self.options.checkpoint, name)
        self.options.vae = name

    def _check_vae(self, name: str | None) -> None:
        if name not in (None, "Automatic", "None") and name not in vae_files(self.config.vae_dir):
            raise ApiError(400, f"unknown VAE {name!r}; GET /sdapi/v1/sd-vae lists them")

    # --- jobs -----------------------------------------------------------------------------------
    def submit(self, kind: str, task: str, body: dict[str, Any], persist: bool = True) -> tuple[JobRecord, Future[JobResult]]:
        """Validate, record and queue a job. 4xx for bad input, 503 when the queue is full."""
        req = parse_request(task, body)
        work = to_work(task, req, self.config.limits, self.config.allow_url_images, self.options.clip_skip)
        if work.checkpoint is not None:
            work.checkpoint = self.checkpoints.find(work.checkpoint).title
        self._check_vae(work.vae)
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
        return max(1, min(60, len(self.queue) // len(self._threads)))  # a rough hint: about a second per job

    def get(self, job_id: str) -> JobRecord | None:
        return self.store.get(job_id)

    def position(self, job_id: str) -> int | None:
        return self.queue.position(job_id)

    @property
    def progress(self) -> Progress:
        """The web UI's "current job": the longest-running one (an empty Progress when none runs)."""
        with self._lock:
            return next(iter(self._running.values()), Progress())

    @property
    def running_count(self) -> int:
        with self._lock:
            return len(self._running)

    def progress_of(self, job_id: str) -> Progress | None:
        with self._lock:
            return self._running.get(job_id)

    def cancel(self, job_id: str) -> JobRecord:
        with self._lock:
            rec = self.store.get(job_id)
            if rec is None:
                raise ApiError(404, f"no job {job_id}")
            running = self._running.get(job_id)
            if rec.status == QUEUED and self.queue.remove(job_id):
                self._finish(rec, CANCELLED, error="cancelled before it started")
            elif rec.status == RUNNING and running is not None:
                running.cancelled = True  # the step callback stops it
            elif rec.status in FINISHED:
                raise ApiError(409, f"job {job_id} has already finished ({rec.status})")
        if running is not None and running.cancelled:
            self._signal(running)
        return self.store.get(job_id) or rec

    def interrupt(self) -> None:
        self._flag_current("interrupted")

    def skip(self) -> None:
        self._flag_current("skipped")

    def _flag_current(self, flag: str) -> None:
        progress = self.progress
        if progress.job_id is not None:
            setattr(progress, flag, True)
            self._signal(progress)

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

    # --- the workers ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            job_id = self.queue.get(timeout=0.5)
            if job_id is None:
                continue
            with self._lock:
                rec = self.store.get(job_id)
                if rec is None or rec.status != QUEUED:
                    continue
                rec.attempts += 1
                self.store.update(job_id, status=RUNNING, started=time.time(), attempts=rec.attempts)
                progress = Progress(job_id=job_id, task=rec.task, started=time.time(),
                                    timestamp=time.strftime("%Y%m%d%H%M%S"))
                self._running[job_id] = progress
                work = self._work.get(job_id)
            try:
                outcome, work = self._start(rec, work, progress)
            finally:
                with self._lock:
                    self._running.pop(job_id, None)
            self._settle(rec, work, outcome, progress)
            if time.monotonic() - self._pruned > PRUNE_EVERY_S:
                self.prune()

    def _start(self, rec: JobRecord, work: Work | None, progress: Progress) -> tuple[Outcome, Work | None]:
        """The job's work and model, then `_execute`."""
        try:
            if work is None:  # re-queued after a restart: validate the stored request again
                req = parse_request(rec.task, rec.request)
                work = to_work(rec.task, req, self.config.limits, self.config.allow_url_images, self.options.clip_skip)
                work.controls = resolve_models(work.controls, self.config.controlnet_dir)
            checkpoint = self.checkpoints.find(work.checkpoint) if work.checkpoint else self.options.checkpoint
            vae = work.vae or self.options.vae
            if rec.request.get("override_settings_restore_afterwards", True) is False:  # the settings stay
                self.options.checkpoint, self.options.vae = checkpoint, vae
        except ValueError as e:  # ApiError too
            return Outcome.refused(e), work
        progress.job_count = work.n_iter
        return self._execute(rec, work, checkpoint, vae, progress), work

    def _settle(self, rec: JobRecord, work: Work | None, outcome: Outcome, progress: Progress) -> None:
        """Save and record what the job ended with, and answer its waiting client."""
        if outcome.status == QUEUED:  # the server is stopping: the job runs after the restart
            self.store.update(rec.id, status=QUEUED, attempts=rec.attempts - 1)
            future = self._futures.pop(rec.id, None)
            if future is not None and not future.done():
                future.set_exception(ApiError(503, "the server is shutting down; the job will run after it "
                                                   "restarts", headers={"Retry-After": "10"}))
            return
        if outcome.status != DONE or outcome.rendered is None or work is None:
            with self._lock:
                self._finish(rec, outcome.status, error=outcome.error, exc=outcome.client_error())
            return
        result = outcome.rendered
        infotexts = [im.info.get("parameters", "") for im in result.pictures]
        info = info_json(work, infotexts, Path(result.model_name).stem, result.model_hash, progress.timestamp,
                         result.inpainting_model, f"stablekit {__version__}")
        names = []
        if rec.persist:
            folder = self.config.outputs / rec.id  # the id is ours: no client string in any path
            names = [save_png(im, folder, work.params.seed + i).name for i, im in enumerate(result.pictures)]
        with self._lock:
            self._finish(rec, DONE, info=info, images=names, pictures=result.pictures)

    def prune(self) -> list[str]:
        """Apply the retention limits (finished jobs only); logs what it removed."""
        self._pruned = time.monotonic()
        removed = prune(self.store, self.config.outputs, self.retention)
        if removed:
            log.info("retention: removed %d finished job(s), oldest %s", len(removed), removed[0])
        return removed

    def on_step(self, progress: Progress, seconds: float | None) -> None:
        """A running job finished a step (`seconds`: its time; None for a job's first step)."""
        self.metrics.step(seconds)

    def image_path(self, rec: JobRecord, index: int) -> Path | None:
        if not 0 <= index < len(rec.images):
            return None
        return self.config.outputs / rec.id / rec.images[index]


class LocalBackend(Backend):
    """One engine in this process; one worker thread runs the jobs on it."""

    def __init__(self, config: ServerConfig, loader: EngineLoader, queue: JobQueue | None = None):
        super().__init__(config, queue, workers=1)
        self.slot = EngineSlot(loader, self.checkpoints)

    def _prepare(self) -> None:
        self._use(self.options.checkpoint, self.options.vae)

    def _use(self, checkpoint: Checkpoint, vae: str) -> None:
        self.slot.call(lambda engine: None, checkpoint, vae)

    def _execute(self, rec: JobRecord, work: Work, checkpoint: Checkpoint, vae: str, progress: Progress) -> Outcome:
        return run_job(self.slot, work, checkpoint, vae, progress, self.on_step)

    def run_exclusive(self, fn: Callable[[Engine], T]) -> T:
        with self.slot.lock:
            return fn(self.engine)

    @property
    def engine(self) -> Engine:
        assert self.slot.engine is not None
        return self.slot.engine

    @property
    def resolution(self) -> int | None:
        return self.slot.engine.config.resolution if self.slot.engine is not None else None

    def preview(self, latent: torch.Tensor) -> Image.Image:
        if self.slot.engine is None:
            return latent_preview(latent)
        return model_preview(latent, self.engine.loaded.model, self.engine.config.vae)
