"""What a ControlNet costs per sampling step: the UNet alone vs the UNet with one and two ControlNets,
and with a ControlNet past its end (which must cost nothing), measured alternately in one process on
SD 1.5's exact shapes with random weights (a CFG step: batch 2).

    python -m stablekit.bench.controlnet [--size 512] [--dtype bf16] [--repeats 3]

The ControlNet copies the UNet's encoder and middle block (about a third of its weights and, at a
given size, somewhat less than half of its work, since the decoder runs at the larger sizes too).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from ..config import PRESETS
from ..diffusion.cond import Cond, ControlInput
from ..models.controlnet import ControlNet, ControlNetConfig
from ..models.unet import UNetModel
from ..pipeline.control import ControlledUNet


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.inference_mode()
def measure(size: int, dtype: torch.dtype, repeats: int) -> dict[str, list[float]]:
    cfg = PRESETS["sd1"].unet
    torch.manual_seed(0)
    unet = UNetModel(cfg).to(dtype).eval()
    nets = [ControlNet(ControlNetConfig(cfg)).to(dtype).eval() for _ in range(2)]
    h = size // 8
    x = torch.randn(2, 4, h, h, dtype=dtype)
    t = torch.full((2,), 500.0)
    context = torch.randn(2, 77, cfg.context_dim, dtype=dtype)
    hint = torch.rand(2, 3, size, size, dtype=dtype)
    scales = torch.ones(2, len(nets[0].skip_channels) + 1)
    on, off = (lambda: True), (lambda: False)
    controlled = ControlledUNet(unet)
    cases = {
        "UNet alone": lambda: unet(x, t, Cond(context)),
        "+ 1 ControlNet": lambda: controlled(x, t, Cond(context, control=(ControlInput(nets[0], hint, scales, on),))),
        "+ 2 ControlNets": lambda: controlled(x, t, Cond(context, control=tuple(
            ControlInput(n, hint, scales, on) for n in nets))),
        "+ 1 past its end": lambda: controlled(x, t, Cond(context, control=(ControlInput(nets[0], hint, scales, off),))),
    }
    for fn in cases.values():  # warm-up: first calls pay for allocation and kernel selection
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):  # alternating, so drift in the machine's speed hits every case alike
        for name, fn in cases.items():
            times[name].append(_timed(fn))
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stablekit.bench.controlnet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="picture side (a multiple of 64)")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    times = measure(args.size, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype], args.repeats)
    base = statistics.median(times["UNet alone"])
    print(f"ControlNet cost per CFG step (batch 2), SD 1.5 shapes, {args.size}x{args.size}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}:")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:18} {median:7.2f} s   {median / base:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
