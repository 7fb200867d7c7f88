"""What both training stages share: learning-rate schedule, EMA, checkpoints, the loss log."""

from __future__ import annotations

import functools
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn


@dataclass(frozen=True)
class StageConfig:
    """Optimisation settings of one stage. `steps` counts optimiser steps."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 100
    decay_from: float = 0.7  # the last 30% of steps decay the learning rate linearly to 10%
    weight_decay: float = 0.0
    ema: float = 0.0  # 0: no EMA copy
    log_every: int = 25
    save_every: int = 250
    sample_every: int = 500
    seed: int = 0
    stop_after: int | None = None  # end this run (state saved) at this step; a later run resumes

    @property
    def end(self) -> int:
        return self.steps if self.stop_after is None else min(self.steps, self.stop_after)

    def should_save(self, done: int) -> bool:
        return done % self.save_every == 0 or done == self.end

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        start = int(self.steps * self.decay_from)
        if step < start:
            return self.lr
        return self.lr * (1 - 0.9 * (step - start) / max(1, self.steps - start))


class EMA:
    """Exponential moving average of parameters; sampling uses the average (Polyak averaging)."""

    def __init__(self, params: Iterable[nn.Parameter], decay: float):
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short warm-up so early averages are not all init
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call twice to restore)."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def save_state(path: Path, step: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
               ema: EMA | None) -> None:
    """A resumable training state, written atomically; tensors and plain types only (weights-only loadable)."""
    state = {"step": step, "optimizer": optimizer.state_dict(),
             "modules": {k: m.state_dict() for k, m in modules.items()},
             "ema": ema.shadow if ema else None}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
               ema: EMA | None) -> int:
    """Restore a state written by save_state; returns the step to continue from."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for k, m in modules.items():
        m.load_state_dict(state["modules"][k])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None and state["ema"] is not None:
        for s, saved in zip(ema.shadow, state["ema"]):
            s.copy_(saved)
    return int(state["step"])


class LossLog:
    """Appends one JSON line per logged step (step, losses, lr, seconds) to `path`."""

    def __init__(self, path: Path, config: StageConfig):
        self.path = path
        self.start = time.perf_counter()
        if not path.exists():
            path.write_text(json.dumps({"config": asdict(config)}) + "\n")

    def write(self, step: int, lr: float, **losses: float) -> None:
        row = {"step": step, "lr": lr, "seconds": round(time.perf_counter() - self.start, 1),
               **{k: round(v, 6) for k, v in losses.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def grid(pictures: torch.Tensor, columns: int) -> torch.Tensor:
    """[N, 3, H, W] -> one picture [3, rows*H, columns*W] (missing cells black)."""
    n, c, h, w = pictures.shape
    rows = math.ceil(n / columns)
    out = pictures.new_zeros(c, rows * h, columns * w)
    for i in range(n):
        r, k = divmod(i, columns)
        out[:, r * h:(r + 1) * h, k * w:(k + 1) * w] = pictures[i]
    return out


def plot_losses(log: Path, png: Path, key: str = "mse", size: tuple[int, int] = (640, 320)) -> Path | None:
    """A PNG of a LossLog's `key` against the step (log-scaled loss), beside the log; None without points."""
    from PIL import Image, ImageDraw

    rows = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    points = [(r["step"], r[key]) for r in rows if r.get(key, 0) > 0]
    if len(points) < 2:
        return None
    w, h, pad = *size, 40
    steps, values = [p[0] for p in points], [math.log10(p[1]) for p in points]
    lo, hi = min(values), max(values)
    span_x, span_y = max(steps[-1] - steps[0], 1), max(hi - lo, 1e-6)
    xy = [(pad + (s - steps[0]) / span_x * (w - 2 * pad), h - pad - (v - lo) / span_y * (h - 2 * pad))
          for s, v in zip(steps, values)]
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((pad, pad, w - pad, h - pad), outline=(180, 180, 180))
    draw.line(xy, fill=(30, 80, 200), width=2)
    draw.text((pad, 8), f"{key} (log scale) {10 ** hi:.4g} .. {10 ** lo:.4g}; steps {steps[0]}..{steps[-1]}",
              fill="black")
    image.save(png)
    return png


@contextmanager
def checkpointed(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Inside: the modules' activations are recomputed in the backward pass instead of kept
    (gradient checkpointing), trading about a third more compute for far less memory."""
    originals = [(m, m.forward) for m in modules]
    for m, forward in originals:
        m.forward = functools.partial(torch.utils.checkpoint.checkpoint, forward, use_reentrant=False)
    try:
        yield
    finally:
        for m, forward in originals:
            m.forward = forward
