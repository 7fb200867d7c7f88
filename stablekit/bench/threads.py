"""Sampling time under contention: the demo model's txt2img with each OpenMP wait policy and thread
count, on an idle machine and with busy-loop processes taking the cores (a reproducible load).

    python -m stablekit.bench.threads [--load 2] [--steps 20]

Each run is a fresh process (the wait policy is read when torch loads OpenMP); the time is the
sampling call's alone, after loading.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
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
SETTINGS = (("libgomp default", "", None), ("passive (stablekit's)", "PASSIVE", None), ("1 thread", "PASSIVE", "1"))


def _spin() -> None:
    while True:
        pass


def sample_time(policy: str, threads: str | None, steps: int) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}  # empty: the runtime's own default
    env.pop("OMP_NUM_THREADS", None)
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
    args = ap.parse_args(argv)
    print(f"{'setting':24} {'idle':>8} {f'{args.load} busy':>8}")
    results = {name: [sample_time(policy, threads, args.steps)] for name, policy, threads in SETTINGS}
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.load)]
    for s in spinners:
        s.start()
    try:
        for name, policy, threads in SETTINGS:
            results[name].append(sample_time(policy, threads, args.steps))
    finally:
        for s in spinners:
            s.terminate()
    for name, (idle, loaded) in results.items():
        print(f"{name:24} {idle:7.2f}s {loaded:7.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
