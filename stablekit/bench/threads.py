"""Sampling time under contention: the demo model's txt2img with each OpenMP wait policy and thread
count, on an idle machine and with busy-loop processes taking the cores (a reproducible load).

    python -m stablekit.bench.threads [--load 2] [--steps 20]

Each run is a fresh process (the wait policy is read when torch loads OpenMP); the time is the
sampling call's alone, after loading; each cell is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys

RUN = """
import time, stablekit
engine = stablekit.load("shapes-demo")
engine.txt2img(prompt="a red circle", seed=1, steps=2)  # warm-up
t = time.perf_counter()
engine.txt2img(prompt="a red circle on a blue background", seed=1, steps={steps})
print(time.perf_counter() - t)
"""
# (name, OMP_WAIT_POLICY, GOMP_SPINCOUNT, OMP_NUM_THREADS); empty: the runtime's own default
SETTINGS = (("libgomp default", "", "", None), ("passive", "PASSIVE", "", None),
            ("spin 100k", "", "100000", None), ("1 thread", "", "", "1"))


def _spin() -> None:
    while True:
        pass


def sample_time(policy: str, spin: str, threads: str | None, steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update({k: v for k, v in (("OMP_WAIT_POLICY", policy), ("GOMP_SPINCOUNT", spin)) if v})
    if threads:
        env["OMP_NUM_THREADS"] = threads
    out = subprocess.run([sys.executable, "-c", RUN.format(steps=steps)], env=env, capture_output=True, text=True,
                         check=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stablekit.bench.threads", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", type=int, default=os.cpu_count() or 1, help="busy processes for the loaded runs")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is shown (loaded runs vary)")
    args = ap.parse_args(argv)
    print(f"{'setting':24} {'idle':>8} {f'{args.load} busy':>8}")
    def median(*rest: str | None) -> float:
        return statistics.median(sample_time(*rest, args.steps) for _ in range(args.repeats))

    results = {name: [median(*rest)] for name, *rest in SETTINGS}
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.load)]
    for s in spinners:
        s.start()
    try:
        for name, *rest in SETTINGS:
            results[name].append(median(*rest))
    finally:
        for s in spinners:
            s.terminate()
    for name, (idle, loaded) in results.items():
        print(f"{name:24} {idle:7.2f}s {loaded:7.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
