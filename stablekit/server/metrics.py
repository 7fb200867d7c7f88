"""What a shared server reports about itself: `GET /metrics` in the Prometheus text format, and one
structured (JSON) log line per finished job.

Counters live in the process (they restart at zero with it, as Prometheus expects of counters);
jobs by state come from the job store, so they include what earlier runs left there.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from .jobs import JobRecord

log = logging.getLogger("stablekit.server.jobs")


@dataclass
class Metrics:
    """Counters the worker updates; read by /metrics."""

    started: float = field(default_factory=time.time)
    jobs: dict[str, int] = field(default_factory=dict)  # finished jobs by outcome, this process
    images: int = 0
    steps: int = 0
    step_seconds: float = 0.0  # summed time between sampler steps
    job_seconds: float = 0.0  # summed run time of finished jobs
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def step(self, seconds: float | None) -> None:
        """A sampler step finished in `seconds` (None: a job's first, whose time includes its set-up)."""
        if seconds is None:
            return
        with self._lock:
            self.steps += 1
            self.step_seconds += seconds

    def job_finished(self, rec: JobRecord, outcome: str, images: int) -> None:
        seconds = (time.time() - rec.started) if rec.started else 0.0
        with self._lock:
            self.jobs[outcome] = self.jobs.get(outcome, 0) + 1
            self.images += images
            self.job_seconds += seconds
        request = rec.request or {}
        log.info(json.dumps({
            "event": "job", "id": rec.id, "kind": rec.kind, "task": rec.task,
            "size": f"{request.get('width', '?')}x{request.get('height', '?')}", "steps": request.get("steps"),
            "images": images, "seconds": round(seconds, 3), "attempts": rec.attempts, "outcome": outcome,
        }))

    def text(self, queue_length: int, running: int, by_state: Mapping[str, int]) -> str:
        """The Prometheus exposition: HELP, TYPE and samples per metric."""
        with self._lock:
            jobs, images, steps = dict(self.jobs), self.images, self.steps
            step_seconds, job_seconds = self.step_seconds, self.job_seconds
        uptime = time.time() - self.started
        rows: list[tuple[str, str, str, list[tuple[str, float]]]] = [
            ("stablekit_queue_length", "gauge", "jobs waiting behind the running one", [("", queue_length)]),
            ("stablekit_job_running", "gauge", "jobs running now (at most one per engine)", [("", running)]),
            ("stablekit_jobs", "gauge", "job records in the store by state",
             [(f'{{state="{s}"}}', n) for s, n in sorted(by_state.items())]),
            ("stablekit_jobs_finished_total", "counter", "jobs finished by this process, by outcome",
             [(f'{{outcome="{o}"}}', n) for o, n in sorted(jobs.items())]),
            ("stablekit_images_total", "counter", "pictures made by this process", [("", images)]),
            ("stablekit_sampler_steps_total", "counter", "timed sampler steps", [("", steps)]),
            ("stablekit_sampler_step_seconds_total", "counter", "seconds spent in timed sampler steps",
             [("", step_seconds)]),
            ("stablekit_job_seconds_total", "counter", "run time of finished jobs", [("", job_seconds)]),
            ("stablekit_images_per_second", "gauge", "pictures per second of job run time",
             [("", images / job_seconds if job_seconds else 0.0)]),
            ("stablekit_resident_memory_bytes", "gauge", "resident memory of the server process",
             [("", resident_bytes())]),
            ("stablekit_uptime_seconds", "gauge", "seconds since the server started", [("", uptime)]),
        ]
        out = []
        for name, kind, help_text, samples in rows:
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            out += [f"{name}{labels} {_number(value)}" for labels, value in samples]
        return "\n".join(out) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def resident_bytes() -> int:
    """The process's current resident memory (VmRSS), or its peak where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    from ..engine import peak_rss_bytes

    return peak_rss_bytes()


def metrics_router(backend: Any, auth: Any) -> APIRouter:
    router = APIRouter(dependencies=[Depends(auth)], tags=["server"])

    @router.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus text format: queue length, jobs by state, step time, pictures per second, memory."""
        text = backend.metrics.text(len(backend.queue), backend.running_count, backend.store.counts())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return router
