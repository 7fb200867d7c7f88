"""The benchmark's command line and the parent process: one child process per job, then the comparison."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..checkpoint import cache_dir
from .diffusers_side import MISSING
from .inputs import PARTS, SEED, SIDES, Job, load_output
from .report import GB, format_table, machine_info, max_abs_diff, psnr
from .lora_file import RANK, random_lora
from .weights import SHAPES, checkpoint_for, shapes_config

LARGE_DTYPE = "bf16"
LARGE_BUDGET_GB = 8.0  # the memory target for a 1024x1024 tiled-VAE picture at SD 1.5 shapes


def _size(text: str) -> int:
    value = int(text)
    if value < 64 or value % 8:
        raise argparse.ArgumentTypeError(f"picture size must be a multiple of 8 and at least 64, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from . import __doc__ as doc

    ap = argparse.ArgumentParser(prog="python -m stablekit.bench", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    ap.add_argument("--dtype", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    ap.add_argument("--size", type=_size, default=512, help="picture side in pixels (default 512)")
    ap.add_argument("--steps", type=_positive, default=20, help="txt2img steps (default 20)")
    ap.add_argument("--repeats", type=_positive, default=3, help="timed runs of text, unet, vae after a warm-up")
    ap.add_argument("--txt2img-repeats", type=_positive, default=1, help="timed txt2img runs after a 1-step warm-up")
    ap.add_argument("--threads", type=_positive, default=torch.get_num_threads(),
                    help=f"torch threads, the same for both sides (default {torch.get_num_threads()})")
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet on both sides; compile cost shown apart")
    ap.add_argument("--shapes", choices=SHAPES, default="sd1.5",
                    help="sd1.5: the real model's shapes; demo: the small demo model's, for a run in seconds")
    ap.add_argument("--large-size", type=_size, default=1024, help="the `large` part: a bf16 txt2img with VAE tiling")
    ap.add_argument("--large-steps", type=_positive, default=2)
    ap.add_argument("--json", type=Path, default=Path("stablekit-bench.json"), help="where to write all results")
    ap.add_argument("--cache", type=Path, default=cache_dir(), help="where the random checkpoint is kept")
    args = ap.parse_args(argv)
    if "diffusers" in args.sides and not all(importlib.util.find_spec(m) for m in ("diffusers", "transformers")):
        ap.error(MISSING)  # found without importing: the parent never imports diffusers
    return args


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))  # pools sized before torch starts
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


class Children:
    """Runs each job in a process of its own: forked from one server per side that has done that side's
    imports (see child.py), or, where os.fork is missing, in a fresh interpreter per job."""

    def __init__(self, threads: int, logs: Path):
        self.env = _child_env(threads)
        self.logs = logs
        self.servers: dict[str, tuple[subprocess.Popen, Path]] = {}

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc, _ in self.servers.values():
            proc.stdin.close()  # the server's loop ends; it exits
            proc.wait()

    def _server(self, side: str) -> tuple[subprocess.Popen, Path]:
        if side not in self.servers:
            log = self.logs / f"{side}-server.log"  # a file, not a pipe: nobody has to drain it
            with open(log, "w") as err:
                proc = subprocess.Popen([sys.executable, "-m", "stablekit.bench.child", "--serve", side],
                                        env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                        text=True)
            self.servers[side] = proc, log
        return self.servers[side]

    def run(self, job: Job) -> dict:
        """The job's result, or {'error': ...} with the end of its output."""
        if hasattr(os, "fork"):
            proc, log = self._server(job.side)
            proc.stdin.write(job.to_json() + "\n")
            proc.stdin.flush()
            answer = proc.stdout.readline()
            code = json.loads(answer)["exit"] if answer else proc.wait()
            output = log.read_text()
        else:
            done = subprocess.run([sys.executable, "-m", "stablekit.bench.child", job.to_json()], env=self.env,
                                  capture_output=True, text=True)
            code, output = done.returncode, done.stdout + done.stderr
        try:
            return json.loads(Path(job.result).read_text())
        except (OSError, ValueError):
            tail = "\n".join(output.strip().splitlines()[-15:])
            return {"error": f"job process exited with code {code} and no result:\n{tail}"}


def _convert(checkpoint: Path, shapes: str) -> Path:
    """The diffusers folder next to the checkpoint, converted in a child so the parent never imports diffusers."""
    code = ("import sys; from pathlib import Path; from stablekit.bench.diffusers_folder import diffusers_folder_for;"
            "from stablekit.bench.weights import shapes_config;"
            "print(diffusers_folder_for(Path(sys.argv[1]), shapes_config(sys.argv[2])))")
    proc = subprocess.run([sys.executable, "-c", code, str(checkpoint), shapes], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"stablekit.bench: making the diffusers folder failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def plan(args: argparse.Namespace, checkpoint: Path, folder: Path | None, tmp: Path) -> list[Job]:
    context_dim = shapes_config(args.shapes).text.width
    jobs = []

    def add(side: str, part: str, dtype: str, size: int, steps: int, repeats: int) -> None:
        name = f"{side}-{part}-{dtype}"
        naming = "diffusers" if folder else "original"
        lora = str(random_lora(checkpoint, folder, checkpoint.with_name(f"{checkpoint.stem}-lora-{naming}.safetensors"))) \
            if part == "lora" else ""
        jobs.append(Job(side, part, dtype, size, steps, repeats, args.threads, args.compile, str(checkpoint),
                        str(folder or ""), context_dim, str(tmp / f"{name}.pt"), str(tmp / f"{name}.json"), lora))

    for part in (p for p in PARTS if p in args.parts and p != "large"):
        for dtype in args.dtype:
            for side in args.sides:
                repeats = args.txt2img_repeats if part in ("txt2img", "lora") else args.repeats
                add(side, part, dtype, args.size, args.steps, repeats)
    if "large" in args.parts:
        for side in args.sides:
            add(side, "large", LARGE_DTYPE, args.large_size, args.large_steps, 1)
    return jobs


def compare(jobs: list[Job], results: list[dict]) -> tuple[list[dict], dict]:
    """Table rows per (part, dtype) with the max |difference| of the sides' outputs; bf16-vs-fp32 PSNR per side."""
    by_key = {(j.part, j.dtype, j.side): (j, r) for j, r in zip(jobs, results)}
    rows = []
    for part, dtype in dict.fromkeys((j.part, j.dtype) for j in jobs):
        sides = {s: by_key[(part, dtype, s)] for s in SIDES if (part, dtype, s) in by_key}
        row = {"part": part, "dtype": dtype, "size": next(iter(sides.values()))[0].size,
               **{s: r for s, (_, r) in sides.items()}}
        ok = {s: (j, r) for s, (j, r) in sides.items() if "error" not in r}
        if len(ok) == 2:
            (jk, rk), (jd, rd) = ok["stablekit"], ok["diffusers"]
            row["speedup"] = rd["median_s"] / rk["median_s"]
            row["max_abs_diff"] = max_abs_diff(load_output(jk), load_output(jd))
        rows.append(row)
    quality = {}
    for side in SIDES:
        pair = [by_key.get(("txt2img", d, side)) for d in ("fp32", "bf16")]
        if all(p is not None and "error" not in p[1] for p in pair):
            quality[side] = psnr(load_output(pair[0][0]), load_output(pair[1][0]))
    return rows, quality


def summary_lines(args: argparse.Namespace, rows: list[dict], quality: dict) -> list[str]:
    lines = []
    for side, db in quality.items():
        lines.append(f"bf16 vs fp32, final {args.size}x{args.size} picture (seed {SEED}), {side}: PSNR {db:.1f} dB")
    if args.compile:  # the first call compiles (cold cache): its excess over the median is the compile cost
        for row in rows:
            for side in SIDES:
                r = row.get(side)
                if not r or "error" in r or row["part"] not in ("unet", "txt2img"):
                    continue
                if row["part"] == "unet":
                    lines.append(f"compile, {side} unet {row['dtype']}: first call {r['warmup_s']:.2f} s, median "
                                 f"{r['median_s']:.2f} s: compile cost about {r['warmup_s'] - r['median_s']:.2f} s")
                else:
                    lines.append(f"compile, {side} txt2img {row['dtype']}: 1-step warm-up generation "
                                 f"{r['warmup_s']:.2f} s (compiling included), not in the timed runs")
    by_part = {(row["part"], row["dtype"]): row for row in rows}
    for (part, dtype), row in by_part.items():  # a LoRA's cost: the lora row against the plain txt2img row
        plain = by_part.get(("txt2img", dtype))
        if part != "lora" or plain is None:
            continue
        for side in SIDES:
            a, b = plain.get(side), row.get(side)
            if a and b and "error" not in a and "error" not in b:
                lines.append(f"LoRA (rank {RANK}, UNet attention) vs plain txt2img, {side} {dtype}: "
                             f"{b['median_s'] / a['median_s'] - 1:+.1%} per picture after the first")
    for row in rows:
        if row["part"] != "large":
            continue
        for side in SIDES:
            r = row.get(side)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"large {row['size']}x{row['size']} {row['dtype']} VAE tiling, {side}: error")
                continue
            gb = r["peak_rss_bytes"] / GB
            budget = f" (within {LARGE_BUDGET_GB:g} GB: {'yes' if gb <= LARGE_BUDGET_GB else 'NO'})" \
                if args.shapes == "sd1.5" else ""
            lines.append(f"large {row['size']}x{row['size']} {row['dtype']}, {args.large_steps} steps, VAE tiling, "
                         f"{side}: {r['median_s']:.2f} s, peak RSS {gb:.2f} GB{budget}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    checkpoint = checkpoint_for(args.shapes, args.cache)
    folder = _convert(checkpoint, args.shapes) if "diffusers" in args.sides else None
    with tempfile.TemporaryDirectory(prefix="stablekit-bench-") as tmp:
        jobs = plan(args, checkpoint, folder, Path(tmp))
        results = []
        with Children(args.threads, Path(tmp)) as children:
            for i, job in enumerate(jobs, 1):
                print(f"[{i}/{len(jobs)}] {job.side} {job.part} {job.dtype} {job.size}x{job.size} ...", end=" ",
                      file=sys.stderr, flush=True)
                results.append(children.run(job))
                r = results[-1]
                print(r["error"].splitlines()[0] if "error" in r else f"{r['median_s']:.3f} s", file=sys.stderr,
                      flush=True)
        rows, quality = compare(jobs, results)

    print(f"\nstablekit benchmark: {args.shapes} shapes, random weights, {args.threads} threads, "
          f"median of {args.repeats} (txt2img {args.txt2img_repeats}) after a warm-up; speed-up = diffusers / stablekit")
    print(format_table(rows))
    for line in summary_lines(args, rows, quality):
        print(line)
    print("\nWhat each side ran:")
    for row in rows:
        for side in SIDES:
            r = row.get(side)
            if r and "ran" in r:
                print(f"  {row['part']} {row['dtype']} {side}: {r['ran']}")
    errors = [f"{row['part']} {row['dtype']} {s}: {row[s]['error']}" for row in rows for s in SIDES
              if s in row and "error" in row[s]]
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)

    report = {"machine": machine_info(args.threads), "checkpoint": checkpoint.name,
              # where files went is this machine's business, not a result: paths stay out of the report
              "settings": {k: v for k, v in vars(args).items() if not isinstance(v, Path)},
              "rows": rows, "psnr_bf16_vs_fp32_db": {k: (None if math.isinf(v) else v) for k, v in quality.items()},
              "summary": summary_lines(args, rows, quality), "wall_s": time.time() - started}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nresults: {args.json}")
    return 1 if errors else 0
