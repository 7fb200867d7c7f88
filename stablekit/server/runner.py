"""Running one job on an engine: the only part of the server that touches the model.

The local backend calls `run_job` in its worker thread; on Ray Serve each engine replica calls it in
its own process (server/ray_serve.py). Either way the job's progress goes into a `Progress` and its
end is an `Outcome`, a plain value that crosses a process boundary as it is.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image

from ..diffusion.common import SamplingStopped
from ..engine import Engine
from ..pipeline.control import Control
from ..pipeline.control_maps import fit_control_map
from .checkpoints import Checkpoint, Checkpoints
from .errors import ApiError
from .jobs import CANCELLED, DONE, FAILED, QUEUED
from .previews import Previewer, model_previewer
from .webui import Work, iteration_params

log = logging.getLogger("stablekit.server")

EngineLoader = Callable[[str], Engine]


class JobCancelled(Exception):
    """Raised from the step callback when the running job is cancelled: no result is kept."""


class ServerStopping(Exception):
    """Raised from the step callback on shutdown: the job goes back to the queue for the next start."""


@dataclass
class Progress:
    """What a running job is doing, for /sdapi/v1/progress and the job API's events."""

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
    last_step_at: float | None = None  # perf_counter of the last step (step times for /metrics)
    worker: str = ""  # where it runs when that is not this process (Ray Serve: host:pid of the replica)

    def fraction(self) -> float:
        """The web UI's formula: 0.01 + job_no/job_count + step/steps/job_count."""
        if not self.job_count:
            return 0.0
        value = 0.01 + self.job_no / self.job_count
        if self.steps:
            value += self.step / self.steps / self.job_count
        return min(value, 1.0)

    def flags(self) -> dict[str, bool]:
        return {k: getattr(self, k) for k in ("interrupted", "skipped", "cancelled", "stopping")}

    def set_flags(self, flags: dict[str, bool]) -> None:
        for k, v in flags.items():
            setattr(self, k, getattr(self, k) or bool(v))  # a flag once set stays set for the job


@dataclass
class Rendered:
    """A finished job's pictures (with their infotexts in `info["parameters"]`) and the model that made them."""

    pictures: list[Image.Image]
    model_name: str
    model_hash: str
    inpainting_model: bool


@dataclass
class Outcome:
    """How a job ended. status QUEUED: the server is stopping; the job runs again after the restart."""

    status: str
    rendered: Rendered | None = None
    error: str | None = None
    http_status: int | None = None  # set when the request itself was at fault (a 4xx for its client)
    error_name: str | None = None  # the error's name in that answer

    @classmethod
    def refused(cls, e: ValueError) -> Outcome:
        """The request could not be done: a 4xx for its client (400 unless an ApiError says otherwise)."""
        if isinstance(e, ApiError):
            return cls(FAILED, error=str(e), http_status=e.status, error_name=e.name)
        return cls(FAILED, error=str(e), http_status=400, error_name=type(e).__name__)

    def client_error(self) -> ApiError | None:
        return ApiError(self.http_status, self.error or "", name=self.error_name) if self.http_status else None


class EngineSlot:
    """The model one process holds: loaded once, switched when a job names another checkpoint.

    `lock` is held while a job runs or a model loads, so short work outside the queue (depth maps,
    upscales, detected maps) waits for the running job rather than sharing the model with it.
    """

    def __init__(self, loader: EngineLoader, checkpoints: Checkpoints):
        self.loader = loader
        self.checkpoints = checkpoints
        self.lock = threading.Lock()
        self._engine: Engine | None = None
        self._title: str | None = None

    @property
    def engine(self) -> Engine | None:
        return self._engine

    def load(self, checkpoint: Checkpoint) -> Engine:
        """The engine for `checkpoint` (call with `lock` held); a model that cannot load is a 400."""
        if self._engine is None or self._title != checkpoint.title:
            default = self.checkpoints.default()
            spec = self.checkpoints.default_spec if checkpoint.title == default.title else checkpoint.filename
            try:
                engine = self.loader(spec)
            except (ValueError, OSError) as e:
                raise ApiError(400, f"cannot load {checkpoint.title}: {e}") from None
            self._engine, self._title = engine, checkpoint.title  # the old one is freed here
        return self._engine

    def call(self, fn: Callable[[Engine], Any], checkpoint: Checkpoint, vae: str) -> Any:
        """fn(engine) on `checkpoint` with `vae`, while no job runs."""
        with self.lock:
            engine = self.load(checkpoint)
            engine.addons.use_vae(vae)
            return fn(engine)


def step_callback(progress: Progress, on_step: Callable[[Progress, float | None], None]
                  ) -> Callable[[int, int, torch.Tensor], None]:
    """The sampler's per-step callback: record progress, tell `on_step` (with the step's seconds, None for
    a job's first step, whose time includes its set-up), then stop the job if a flag says so."""
    def callback(i: int, n: int, x0: torch.Tensor) -> None:
        now = time.perf_counter()
        seconds = None if progress.step == 0 or progress.last_step_at is None else now - progress.last_step_at
        progress.step, progress.steps, progress.latent, progress.last_step_at = i + 1, n, x0[0].detach(), now
        on_step(progress, seconds)
        if progress.stopping:
            raise ServerStopping()
        if progress.cancelled:
            raise JobCancelled()
        if progress.interrupted or progress.skipped:
            raise SamplingStopped()
    return callback


def render(engine: Engine, work: Work, progress: Progress, callback: Callable[[int, int, torch.Tensor], None]
           ) -> Rendered:
    """Every iteration of the job's n_iter, then the ControlNet maps the client asked to get back."""
    controls = engine.prepare_controls(work.task, work.params, work.controls, **work.inputs)  # once per request
    pictures: list[Image.Image] = []
    for k in range(work.n_iter):
        if progress.interrupted:
            break
        progress.job_no, progress.step, progress.skipped = k, 0, False
        pictures += engine.run(work.task, iteration_params(work, k), callback=callback, controls=controls,
                               **work.inputs)
    pictures += detected_maps(work, controls)
    model = engine.loaded
    return Rendered(pictures, model.name, model.short_hash, engine.config.inputs == "inpaint")


def detected_maps(work: Work, controls: tuple[Control, ...]) -> list[Image.Image]:
    """The maps the ControlNet units saw (at the working size), after the pictures, as the extension
    returns them; a unit's save_detected_map false leaves its map out."""
    p = work.params
    return [Image.fromarray(fit_control_map(c.detected, p.width, p.height, c.unit.resize))
            for c, wanted in zip(controls, work.control_maps) if wanted]


def run_job(slot: EngineSlot, work: Work, checkpoint: Checkpoint, vae: str, progress: Progress,
            on_step: Callable[[Progress, float | None], None]) -> Outcome:
    """Run one job to its outcome; never raises for what a job can do wrong."""
    callback = step_callback(progress, on_step)
    try:
        rendered = slot.call(lambda engine: render(engine, work, progress, callback), checkpoint, vae)
        return Outcome(DONE, rendered)
    except JobCancelled:
        return Outcome(CANCELLED, error="cancelled while running")
    except ServerStopping:
        return Outcome(QUEUED)
    except ValueError as e:  # ApiError too
        return Outcome.refused(e)
    except Exception as e:  # keep serving; the job says what went wrong in one line
        log.exception("job %s failed", progress.job_id)
        return Outcome(FAILED, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")


@dataclass
class EngineInfo:
    """What the HTTP side needs to know of the loaded model when it does not hold it (Ray Serve)."""

    resolution: int
    previewer: Previewer


def engine_info(engine: Engine) -> EngineInfo:
    from copy import deepcopy

    previewer = model_previewer(engine.loaded.model, engine.config.vae)
    if previewer.vae is not None:  # a small decoder: a copy travels, not the model
        previewer = Previewer(previewer.cfg, deepcopy(previewer.vae).cpu().float())
    return EngineInfo(engine.config.resolution, previewer)
