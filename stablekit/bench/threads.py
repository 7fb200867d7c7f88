"""Sampling time under contention: txt2img with each OpenMP wait policy and thread count, and with
stablekit's automatic count (the cores other programs leave free, `stablekit/threads.py`), on an
idle machine and with busy-loop processes taking the cores (a reproducible load).

    python -m stablekit.bench.threads [--load 2] [--steps 20] [--shapes demo|sd1.5 --size 256]

Each run is a fresh process (the wait policy is read when torch loads OpenMP); the time is the
sampling call's alone, after loading; each cell is the median of --repeats runs. `--shapes sd1.5`
uses random weights of SD 1.5's exact shapes (written once under --work).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..threads import usable_cores
from .weights import SHAPES, random_checkpoint, shapes_config

RUN = """
import time
from stablekit.threads import CpuSample, auto_threads
start = CpuSample.now()
import torch, stablekit
engine = stablekit.load({model!r})
if {auto}:
    torch.set_num_threads(auto_threads(start))  # as the command line does after loading
size = dict(width={size}, height={size})
engine.txt2img(prompt="a red circle", seed=1, steps=1, **size)  # warm-up
t = time.perf_counter()
engine.txt2img(prompt="a red circle on a blue background", seed=1, steps={steps}, **size)
print(time.perf_counter() - t)
"""
AUTO = "stablekit auto"
# (name, OMP_WAIT_POLICY, GOMP_SPINCOUNT, OMP_NUM_THREADS); empty: the runtime's own default
SETTINGS = (("libgomp default", "", "", None), ("passive", "PASSIVE", "", None),
            ("spin 100k", "", "100000", None), ("1 thread", "", "", "1"), (AUTO, "", "", None))


def _spin() -> None:
    while True:
        pass


def sample_time(policy: str, spin: str, threads: str | None, run: dict) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update({k: v for k, v in (("OMP_WAIT_POLICY", policy), ("GOMP_SPINCOUNT", spin)) if v})
    if threads:
        env["OMP_NUM_THREADS"] = threads
    out = subprocess.run([sys.executable, "-c", RUN.format(**run)], env=env, capture_output=True, text=True,
                         check=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stablekit.bench.threads", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", type=int, default=os.cpu_count() or 1, help="busy processes for the loaded runs")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is shown (loaded runs vary)")
    ap.add_argument("--shapes", default="demo", choices=SHAPES, help="the shipped demo model, or SD 1.5's shapes")
    ap.add_argument("--size", type=int, default=64, help="picture width and height")
    ap.add_argument("--work", type=Path, default=Path("bench-work"), help="where SD 1.5-shaped weights are written")
    args = ap.parse_args(argv)
    model = "shapes-demo"
    if args.shapes != "demo":
        model = str(random_checkpoint(shapes_config(args.shapes), args.work / f"random-{args.shapes}.safetensors"))
    print(f"{args.shapes}, {args.size}x{args.size}, {args.steps} steps, {usable_cores()} cores")
    print(f"{'setting':24} {'idle':>8} {f'{args.load} busy':>8}")

    def median(name: str, *rest: str | None) -> float:
        run = dict(model=model, auto=name == AUTO, size=args.size, steps=args.steps)
        return statistics.median(sample_time(*rest, run) for _ in range(args.repeats))

    results = {name: [median(name, *rest)] for name, *rest in SETTINGS}
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.load)]
    for s in spinners:
        s.start()
    try:
        time.sleep(2)  # the spinners are running before the first measured start
        for name, *rest in SETTINGS:
            results[name].append(median(name, *rest))
    finally:
        for s in spinners:
            s.terminate()
    best = [min(r[i] for r in results.values()) for i in (0, 1)]
    for name, (idle, loaded) in results.items():
        print(f"{name:24} {idle:7.2f}s {loaded:7.2f}s   ({idle / best[0]:.2f}x / {loaded / best[1]:.2f}x the best)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
