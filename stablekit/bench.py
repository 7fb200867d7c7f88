"""Timing of one txt2img on random weights with the exact SD 1.5 shapes (no download needed).

    python -m stablekit.bench [--dtype fp32 bf16] [--size 512] [--steps 20] [--threads N]

The random checkpoint is written once as an original-layout single file and cached.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from .checkpoint import cache_dir
from .config import PRESETS
from .models import StableDiffusionModel


@torch.no_grad()
def random_checkpoint(preset: str, path: Path, seed: int = 0) -> Path:
    """Write random weights of `preset`'s exact shapes as a single-file checkpoint (cached)."""
    if path.is_file():
        return path
    from safetensors.torch import save_file

    model = StableDiffusionModel(PRESETS[preset])
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
        else:  # fan-in scaled, so activations stay finite through the deep networks
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.rename(path)
    return path


def time_txt2img(path: Path, dtype: str, size: int, steps: int, sampler: str) -> dict:
    from . import GenerationParams, load

    t0 = time.perf_counter()
    engine = load(path, dtype=dtype, device="cpu")
    load_s = time.perf_counter() - t0
    params = GenerationParams(prompt="a photograph of an astronaut riding a horse", width=size, height=size,
                              steps=steps, cfg_scale=7.0, sampler=sampler, seed=1)
    step_times: list[float] = []
    last = [time.perf_counter()]

    def on_step(i: int, n: int, x0: torch.Tensor) -> None:
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    t0 = time.perf_counter()
    last[0] = t0
    pictures, _ = engine.txt2img_tensor(params, callback=on_step)
    total = time.perf_counter() - t0
    sampling = sum(step_times)
    return {"dtype": dtype, "size": size, "steps": steps, "sampler": sampler, "load_s": round(load_s, 2),
            "total_s": round(total, 2), "per_step_s": round(sorted(step_times)[len(step_times) // 2], 3),
            "decode_and_text_s": round(total - sampling, 2), "finite": bool(torch.isfinite(pictures).all())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="Euler")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", type=Path, default=cache_dir())
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = random_checkpoint("sd1", args.cache / "random-sd1.5-shapes.safetensors")
    results = []
    for dtype in args.dtype:
        r = time_txt2img(path, dtype, args.size, args.steps, args.sampler)
        r["threads"] = torch.get_num_threads()
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
