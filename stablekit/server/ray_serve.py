"""`stablekit serve --ray`: the same HTTP API with the engines in Ray Serve replicas.

Three parts, all in one Ray Serve application:
- `EngineReplica` (deployment "engine", N replicas or autoscaled): loads the model once, runs one job
  at a time (`max_ongoing_requests=1`) and streams its steps back, then its `Outcome`.
- `Ingress` (deployment "ingress", one replica): the FastAPI app of the single-process server over a
  `RayBackend`: the same SQLite job store and FIFO queue, one worker thread per engine replica, each
  handing a job to whichever replica Serve routes it to.
- `JobFlags` (a plain actor made by the `serve` command): interrupt / skip / cancel / stop flags, set by
  the ingress and read by the replica running the job at every step, so they reach that replica.

A replica that dies during a job (killed, out of memory, its node lost) fails the stream; the worker
sends the job again (same request, same seed: the same picture) to another replica, and a job that has
taken down two replicas is failed, as the single server fails a job that crashed it twice. Ray is
imported by this module only: `stablekit serve` without --ray never needs it.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import ray
import torch
from PIL import Image
from ray import serve

from ..engine import Engine
from .checkpoints import Checkpoint, Checkpoints
from .config import ServerConfig
from .jobs import FAILED, MAX_ATTEMPTS, JobRecord
from .previews import latent_preview
from .runner import EngineInfo, EngineSlot, Outcome, Progress, engine_info, run_job
from .webui import Work
from .worker import Backend

log = logging.getLogger("stablekit.server")
T = TypeVar("T")
APP = "stablekit"
NO_REPLICA_S = 300.0  # how long a job waits for a live replica (replicas restarting) before it fails


@ray.remote(num_cpus=0)
class JobFlags:
    """job id -> the flags the ingress set for it (interrupted, skipped, cancelled, stopping)."""

    def __init__(self) -> None:
        self._flags: dict[str, dict[str, bool]] = {}

    def set(self, job_id: str, flags: dict[str, bool]) -> None:
        self._flags[job_id] = flags

    def get(self, job_id: str) -> dict[str, bool]:
        return self._flags.get(job_id, {})

    def drop(self, job_id: str) -> None:
        self._flags.pop(job_id, None)


class EngineReplica:
    """One engine per replica process: jobs one at a time, short calls (depth maps, upscales) between them."""

    def __init__(self, config: ServerConfig, threads: int | None, flags: Any):
        from ..engine import set_threads
        from .app import default_loader

        if threads:
            set_threads(threads)
        self.flags = flags
        self.where = f"{socket.gethostname()}:{os.getpid()}"
        self.slot = EngineSlot(default_loader(config), Checkpoints(config.model, config.models_dir))
        self.slot.call(lambda engine: None, self.slot.checkpoints.default(), "Automatic")  # the model, once

    def run(self, job_id: str, work: Work, checkpoint: Checkpoint, vae: str) -> Iterator[Any]:
        """Yields {"worker": where} first, then one dict per step, then the job's Outcome."""
        events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        progress = Progress(job_id=job_id, task=work.task, started=time.time())

        def on_step(p: Progress, seconds: float | None) -> None:
            events.put({"job_no": p.job_no, "step": p.step, "steps": p.steps, "seconds": seconds,
                        "latent": None if p.latent is None else p.latent.float().cpu()})
            p.set_flags(ray.get(self.flags.get.remote(job_id)))

        progress.set_flags(ray.get(self.flags.get.remote(job_id)))  # set while the job was on its way
        thread = threading.Thread(target=lambda: events.put(run_job(self.slot, work, checkpoint, vae, progress,
                                                                    on_step)), daemon=True)
        thread.start()
        yield {"worker": self.where}
        while True:
            event = events.get()
            yield event
            if isinstance(event, Outcome):
                return

    def call(self, fn: Callable[[Engine], T], checkpoint: Checkpoint, vae: str) -> T:
        return self.slot.call(fn, checkpoint, vae)


class RayBackend(Backend):
    """The single server's backend with `_execute` sending each job to an engine replica."""

    def __init__(self, config: ServerConfig, engines: Any, flags: Any, workers: int):
        super().__init__(config, workers=workers)
        self.engines = engines  # the engine deployment's handle
        self.flags = flags
        self.info: EngineInfo | None = None
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="stablekit-ray-wait")

    def _result(self, response: Any) -> Any:
        """A handle call's result, also from the event loop's thread (start-up runs there)."""
        return self._waiter.submit(response.result).result()

    def _call(self, fn: Callable[[Engine], T], checkpoint: Checkpoint, vae: str) -> T:
        return self._result(self.engines.call.remote(fn, checkpoint, vae))

    def _prepare(self) -> None:
        self._use(self.options.checkpoint, self.options.vae)

    def _use(self, checkpoint: Checkpoint, vae: str) -> None:
        """Load it on one replica for the checks and the previews; every replica loads it with its next job."""
        self.info = self._call(engine_info, checkpoint, vae)

    def run_exclusive(self, fn: Callable[[Engine], T]) -> T:
        return self._call(fn, self.options.checkpoint, self.options.vae)

    @property
    def resolution(self) -> int | None:
        return self.info.resolution if self.info else None

    def preview(self, latent: torch.Tensor) -> Image.Image:
        return self.info.previewer(latent) if self.info else latent_preview(latent)

    def _signal(self, progress: Progress) -> None:
        if progress.job_id is not None:
            self.flags.set.remote(progress.job_id, progress.flags())

    def _execute(self, rec: JobRecord, work: Work, checkpoint: Checkpoint, vae: str, progress: Progress) -> Outcome:
        deadline = time.monotonic() + NO_REPLICA_S
        try:
            while True:
                try:
                    return self._stream(rec, work, checkpoint, vae, progress)
                except ray.exceptions.RayError as e:
                    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    if not progress.worker:  # it never started: no replica could take it (yet)
                        if time.monotonic() > deadline:
                            return Outcome(FAILED, error=f"no engine replica could take the job: {reason}")
                        time.sleep(1.0)
                        continue
                    log.warning("job %s: replica %s stopped during the job (%s)", rec.id, progress.worker, reason)
                    if rec.attempts >= MAX_ATTEMPTS:
                        return Outcome(FAILED, error=f"the replica running this job stopped {rec.attempts} times "
                                                     f"(last: {progress.worker}); not retried")
                    rec.attempts += 1
                    self.store.update(rec.id, attempts=rec.attempts)
                    progress.worker, progress.step, progress.steps, progress.latent = "", 0, 0, None
        finally:
            self.flags.drop.remote(rec.id)

    def _stream(self, rec: JobRecord, work: Work, checkpoint: Checkpoint, vae: str, progress: Progress) -> Outcome:
        for event in self.engines.options(stream=True).run.remote(rec.id, work, checkpoint, vae):
            if isinstance(event, Outcome):
                return event
            if "worker" in event:
                progress.worker = event["worker"]
                continue
            progress.job_no, progress.step, progress.steps = event["job_no"], event["step"], event["steps"]
            progress.latent = event["latent"]
            self.on_step(progress, event["seconds"])
        raise ray.exceptions.RayError("the replica's stream ended without an outcome")


class Ingress:
    """The HTTP side: the single server's FastAPI app over a RayBackend."""

    def __init__(self, config: ServerConfig, engines: Any, flags: Any, workers: int):
        self.backend = RayBackend(config, engines, flags, workers)

    def __serve_build_asgi_app__(self) -> Any:
        from .app import create_app

        return create_app(self.backend.config, backend=self.backend)  # its lifespan starts the backend


def absolute(config: ServerConfig) -> ServerConfig:
    """Paths made absolute: replicas do not run in this process's folder."""
    paths = {k: Path(v).resolve() for k in ("models_dir", "outputs", "db", "vae", "vae_dir", "lora_dir",
                                             "embeddings_dir", "controlnet_dir") if (v := getattr(config, k))}
    model = str(Path(config.model).resolve()) if Path(config.model).exists() else config.model
    return replace(config, model=model, **paths)


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--autoscale takes MIN:MAX replicas, e.g. 1:4 (got {text!r})") from None
    if not 0 <= low <= high or high < 1:
        raise ValueError(f"--autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return low, high


def deploy(config: ServerConfig, *, replicas: int = 1, autoscale: str | None = None, replica_cpus: float = 1,
           replica_gpus: float = 0, threads: int | None = None, host: str = "127.0.0.1", port: int = 7860,
           ) -> Any:
    """Start Serve's HTTP proxy on host:port and run the application (Ray must be initialised)."""
    if replicas < 1:
        raise ValueError("--replicas must be at least 1")
    config = absolute(config)
    serve.start(http_options={"host": host, "port": port})
    flags = JobFlags.remote()
    scaling: dict[str, Any] = {"num_replicas": replicas}
    workers = replicas
    if autoscale:
        low, high = parse_autoscale(autoscale)
        scaling = {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": 1}}
        workers = high
    engines = serve.deployment(EngineReplica, name="engine", max_ongoing_requests=1, **scaling,
                               ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus})
    ingress = serve.deployment(serve.ingress()(Ingress), name="ingress", num_replicas=1,
                               max_ongoing_requests=config.limits.queue_size + workers + 256,
                               ray_actor_options={"num_cpus": 0})
    app = ingress.bind(config, engines.bind(config, threads, flags), flags, workers)
    serve.run(app, name=APP, route_prefix="/")
    return flags


def run(args: Any, config: ServerConfig) -> int:
    """`stablekit serve --ray [ADDRESS]`: join a cluster (or start a local Ray), deploy, serve until stopped."""
    from ..threads import physical_cores

    if args.replicas < 1:
        raise ValueError("--replicas must be at least 1")
    if args.autoscale:
        parse_autoscale(args.autoscale)  # a bad range is an error before Ray starts
    local = args.ray == "local"
    if args.replica_cpus is None:  # a local instance shares this machine's cores; a cluster's nodes say theirs
        args.replica_cpus = max(1, physical_cores() // (args.replicas or 1)) if local and not args.replica_gpus else 1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports to Ray's usage service
    ray.init(address="local" if local else args.ray, include_dashboard=False, logging_level=logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        deploy(config, replicas=args.replicas, autoscale=args.autoscale, replica_cpus=args.replica_cpus,
               replica_gpus=args.replica_gpus, threads=args.threads or max(1, int(args.replica_cpus)),
               host=args.host, port=args.port)
        print(f"stablekit on Ray Serve: http://{args.host}:{args.port} "
              f"({args.autoscale or args.replicas} engine replica(s)); Ctrl-C stops it", flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP) if not local else serve.shutdown()
        ray.shutdown()
    return 0
