"""Benchmark jobs, each in its own process.

A process per (side, part, dtype) makes the peak resident memory that part's own, and keeps one
side's allocator state, thread pools and imports (diffusers' included) away from the other's.

    python -m stablekit.bench.child '<job json>'    # one job in this fresh process
    python -m stablekit.bench.child --serve SIDE     # a fork server: job lines in, result lines out

The fork server imports one side's libraries once (diffusers and transformers take seconds to
import) and forks a fresh process per job, before any computation, so each job starts where a new
interpreter would after its imports: its peak RSS counts those imports, as a fresh process's would.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from ..engine import peak_rss_bytes
from .inputs import Job, save_output


def current_rss() -> int | None:
    """Resident set size now, in bytes (Linux /proc; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def run_job(job: Job) -> dict:
    torch.set_num_threads(job.threads)  # the same count for both sides; set before any work
    if job.compile:  # a cache of its own: every job pays the cold compile cost, not a warm one from a job before
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(job.result).with_suffix(".inductor"))
    if job.side == "stablekit":
        from .stablekit_side import prepare
    else:
        from .diffusers_side import prepare
    t0 = time.perf_counter()
    prepared = prepare(job)
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss()

    warmup_s = None
    if prepared.warmup is not None:  # first call: one-time costs (allocations, oneDNN primitives, compile)
        t0 = time.perf_counter()
        prepared.warmup()
        warmup_s = time.perf_counter() - t0
    times = []
    out = None
    for _ in range(job.repeats):
        t0 = time.perf_counter()
        out = prepared.run()
        times.append(time.perf_counter() - t0)
    assert out is not None  # repeats >= 1, checked by the command line
    save_output(job, out)
    return {"side": job.side, "part": job.part, "dtype": job.dtype, "size": job.size, "ran": prepared.ran,
            "load_s": load_s, "warmup_s": warmup_s, "times_s": times, "median_s": statistics.median(times),
            "rss_after_load_bytes": rss_loaded, "peak_rss_bytes": peak_rss_bytes(), "threads": torch.get_num_threads(),
            "output_shape": list(out.shape), "output_finite": bool(torch.isfinite(out.float()).all())}


def run_and_write(job: Job) -> int:
    """Run `job`, write its result (or error) JSON where the job says; the exit code."""
    try:
        result = run_job(job)
        code = 0
    except SystemExit as e:  # a clear message (missing diffusers): no traceback
        result, code = {"error": str(e.code)}, 1
    except Exception as e:  # reported in the table and the JSON; the other jobs go on
        result, code = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}, 1
    Path(job.result).write_text(json.dumps(result))
    return code


def preload(side: str) -> None:
    """Import what `side`'s jobs import, resolving diffusers' and transformers' lazy attributes too."""
    if side == "stablekit":
        import stablekit.pipeline.steps  # noqa: F401
        return
    try:
        import diffusers
        import transformers
    except ImportError:
        return  # each job then reports the clear message itself
    for name in ("StableDiffusionPipeline", "EulerDiscreteScheduler", "AutoencoderKL", "UNet2DConditionModel"):
        getattr(diffusers, name)
    for name in ("CLIPTextModel", "CLIPTokenizer"):
        getattr(transformers, name)


def serve(side: str) -> None:
    """Read job JSON lines on stdin; fork a process per job; answer each with its exit code on stdout."""
    preload(side)
    for line in sys.stdin:
        job = Job.from_json(line)
        pid = os.fork()
        if pid == 0:  # the job's process: stdout belongs to the protocol, so its prints go to stderr
            os.dup2(2, 1)
            code = 1
            try:
                code = run_and_write(job)
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    if argv[0] == "--serve":
        serve(argv[1])
        return 0
    return run_and_write(Job.from_json(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
