"""Comparing the two sides' outputs, and the printed table and JSON of a benchmark run."""

from __future__ import annotations

import math
import os
import platform
from importlib import metadata
from pathlib import Path

import torch

GB = 1e9


def machine_info(threads: int) -> dict:
    """Where the numbers were measured: CPU model, cores, threads, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)  # the installed version, without importing the package
        except metadata.PackageNotFoundError:
            return None

    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": version("diffusers"), "transformers": version("transformers"),
            "accelerate": version("accelerate"),  # without it diffusers loads with low_cpu_mem_usage=False
            "stablekit": version("stablekit"), "platform": platform.platform()}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"outputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.float() - b.float()).abs().max())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two [0, 1] pictures (inf when identical)."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def _seconds(r: dict | None) -> str:
    if r is None:
        return "-"
    return "error" if "error" in r else f"{r['median_s']:.3f}"


def _gb(r: dict | None) -> str:
    return "-" if r is None or "error" in r else f"{r['peak_rss_bytes'] / GB:.2f}"


def format_table(rows: list[dict]) -> str:
    """part, dtype, both sides' median seconds, speed-up (diffusers / stablekit), peak RSS, max |diff|."""
    head = ["part", "dtype", "size", "stablekit s", "diffusers s", "speed-up", "stablekit GB", "diffusers GB",
            "max |diff|"]
    lines = [head]
    for row in rows:
        sk, df = row.get("stablekit"), row.get("diffusers")
        speedup = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
        diff = f"{row['max_abs_diff']:.2e}" if row.get("max_abs_diff") is not None else "-"
        lines.append([row["part"], row["dtype"], str(row["size"]), _seconds(sk), _seconds(df), speedup,
                      _gb(sk), _gb(df), diff])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)
