"""Peak memory of the large jobs, at the real models' shapes (random weights), each in its own process.

    python -m stablekit.bench.peak --job upscale   # 512x512 -> 2048x2048 by the SD x4 upscaler, 128-px tiles
    python -m stablekit.bench.peak --job hires     # SD 1.5 txt2img 512x512, hires fix to 1024x1024

Each job runs through the command line in a fresh process, which prints its peak resident memory;
steps are few (memory does not grow with them), so the numbers come in minutes on a CPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..checkpoint.load import cache_dir
from .weights import random_checkpoint

JOBS = {
    "upscale": ("sd2-x4-upscaler-v", ["upscale", "--image", "{picture}", "--steps", "{steps}", "--tile", "128"]),
    "hires": ("sd1", ["txt2img", "--width", "512", "--height", "512", "--steps", "{steps}", "--hires-scale", "2",
                      "--hires-steps", "{steps}", "--sampler", "Euler"]),
}


def run(job: str, steps: int, cache: Path) -> int:
    preset, args = JOBS[job]
    model = random_checkpoint(preset, cache / f"random-{preset}.safetensors")
    with tempfile.TemporaryDirectory() as tmp:
        picture = Path(tmp) / "in.png"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(picture)
        filled = [a.format(picture=picture, steps=steps) for a in args]
        cmd = [sys.executable, "-m", "stablekit.cli", *filled, "--model", str(model), "--prompt", "a photo",
               "--seed", "1", "--out", tmp]
        print("running:", " ".join(cmd[2:]), flush=True)
        return subprocess.run(cmd).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stablekit.bench.peak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", choices=list(JOBS), required=True)
    ap.add_argument("--steps", type=int, default=1, help="sampling steps (default 1: memory does not grow with them)")
    ap.add_argument("--cache", type=Path, default=cache_dir(), help="where the random checkpoints are kept")
    args = ap.parse_args(argv)
    return run(args.job, args.steps, args.cache)


if __name__ == "__main__":
    sys.exit(main())
