"""Throughput of `stablekit serve --ray` against the single-process server, side by side in one run.

    python -m stablekit.bench.ray_serve [--requests 24] [--clients 4] [--model shapes-demo]

Each configuration is a real server (started, measured, stopped in turn) with the same number of CPU
threads in all: the plain server with T threads, Ray with 1 replica x T threads and with T replicas x 1
thread (and both at 1 thread, the like-for-like pair for the Ray path's cost). Two figures each:
- throughput: `--requests` pictures (64x64, 20 Euler steps) from `--clients` concurrent clients, in
  pictures per second of wall time;
- the cost of a request: the mean latency of 20 one-step requests sent one after another; a Ray row's
  figure minus the plain server's with the same threads per engine is what the Ray path adds to each.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .soak import _call, _free_port

WORK = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "steps": 20, "seed": 1,
        "sampler_name": "Euler"}
TINY = {**WORK, "steps": 1}
START_S = 300


@dataclass
class Row:
    name: str
    pictures_per_s: float
    request_ms: float  # mean latency of a one-step request
    start_s: float


def _start(args: list[str], work: Path) -> tuple[subprocess.Popen, str, float]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / f"server-{port}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stablekit.cli", "serve", "--port", str(port), "--outputs",
                             str(work / f"outputs-{port}"), "--log-level", "warning", "--queue-size", "64", *args],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    deadline = time.monotonic() + START_S
    while True:
        try:
            if _call(url, "GET", "/sdapi/v1/options", None)[0] == 200:
                return proc, url, time.perf_counter() - t0
        except (OSError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"the server did not start:\n{Path(log.name).read_text()}")
        time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of a Ray instance
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _generate(url: str, body: dict) -> None:
    status, _ = _call(url, "POST", "/sdapi/v1/txt2img", json.dumps(body).encode())
    if status != 200:
        raise RuntimeError(f"txt2img answered {status}")


def measure(name: str, args: list[str], requests: int, clients: int, work: Path) -> Row:
    proc, url, start_s = _start(args, work)
    try:
        for _ in range(2 * clients):  # warm-up: every replica has run a job
            _generate(url, {**WORK, "steps": 2})
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda i: _generate(url, {**WORK, "seed": i}), range(requests)))
        throughput = requests / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(20):
            _generate(url, {**TINY, "seed": i})
        return Row(name, throughput, (time.perf_counter() - t0) / 20 * 1000, start_s)
    finally:
        _stop(proc)


def configurations(model: str, threads: int) -> list[tuple[str, int, list[str]]]:
    """(name, threads per engine, flags): the plain server and one Ray replica at 1 and T threads, T replicas."""
    base = ["--model", model]
    rows = []
    for t in sorted({threads, 1}, reverse=True):
        rows += [(f"plain server, {t} thread(s)", t, [*base, "--threads", str(t)]),
                 (f"Ray, 1 replica x {t} thread(s)", t, [*base, "--ray", "--replicas", "1", "--replica-cpus", str(t)])]
    rows.append((f"Ray, {threads} replicas x 1 thread", 1,
                 [*base, "--ray", "--replicas", str(threads), "--replica-cpus", "1"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stablekit.bench.ray_serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-demo")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--size", type=int, default=64, help="width and height of the pictures")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads in every configuration")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    WORK.update(width=args.size, height=args.size)
    TINY.update(width=args.size, height=args.size)
    configs = configurations(args.model, args.threads)
    rows = [measure(name, flags, args.requests, args.clients, work) for name, _, flags in configs]
    plain = {threads: row for (name, threads, _), row in zip(configs, rows) if name.startswith("plain")}
    base = rows[0]
    print(f"{args.requests} pictures of {args.size}x{args.size}, 20 steps, {args.clients} clients; {os.cpu_count()} cores")
    print(f"{'configuration':34} {'pictures/s':>10} {'vs first':>8} {'1-step request':>15} {'added':>8} {'start':>7}")
    for (_, threads, _), r in zip(configs, rows):  # added: against the plain server with the same threads
        print(f"{r.name:34} {r.pictures_per_s:10.2f} {r.pictures_per_s / base.pictures_per_s:7.2f}x "
              f"{r.request_ms:12.0f} ms {r.request_ms - plain[threads].request_ms:+6.0f} ms {r.start_s:6.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
