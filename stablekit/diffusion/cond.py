"""Cond: everything that conditions one UNet call besides the noisy latent and the timestep.

One value travels from the task through the denoiser wrappers into the network, so new kinds of
conditioning (a pooled vector, a depth channel, a noise level) add a slot here, not a positional
argument to every signature.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch


@dataclass(frozen=True)
class Cond:
    """Conditioning for a batch of B.

    crossattn: [B, T, C] text tokens the UNet attends to (T = 77 per prompt chunk).
    vector:    [B, D] float (LDM `adm`: pooled text, size conditioning) or [B] long (class labels,
               the x4 upscaler's noise level); added to the time embedding. None: no vector input.
    concat:    [B, c, h, w] extra input channels after the latent (inpainting: mask + masked-picture
               latent; depth; the low-resolution picture). None: a base model.
    """

    crossattn: torch.Tensor
    vector: torch.Tensor | None = None
    concat: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.crossattn.shape[0]

    def _parts(self) -> tuple[torch.Tensor | None, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def batchable_with(self, other: Cond) -> bool:
        """Whether the two can run as one batch: the same parts, each of the same shape past the batch."""
        return all(
            (a is None and b is None) or (a is not None and b is not None and a.shape[1:] == b.shape[1:])
            for a, b in zip(self._parts(), other._parts())
        )

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        """One Cond for the batches one after another (they must be batchable with each other)."""
        first = conds[0]
        if not all(first.batchable_with(c) for c in conds[1:]):
            raise ValueError("conditionings of different shapes cannot be batched; run them as separate calls")
        parts = zip(*(c._parts() for c in conds))
        return Cond(*(None if p[0] is None else torch.cat(p) for p in parts))

    def to(self, dtype: torch.dtype) -> Cond:
        """Floating-point parts in `dtype` (the network's); integer class labels stay as they are."""
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(dtype) if t is not None and t.is_floating_point() else t
        return Cond(*(cast(p) for p in self._parts()))


@dataclass(frozen=True)
class CondSchedule:
    """A prompt's conditioning over the denoiser calls (the web UI's prompt editing and alternation).

    entries: (last call it serves, Cond), ascending; calls are counted from 0, one per denoiser
    evaluation, as the web UI's CFGDenoiser counts its `step`. A plain prompt has one entry.
    """

    entries: tuple[tuple[int, Cond], ...]

    @staticmethod
    def constant(cond: Cond) -> CondSchedule:
        return CondSchedule(((0, cond),))

    def at(self, call: int) -> Cond:
        for last, cond in self.entries:
            if call <= last:
                return cond
        # Past the schedule's end the web UI's lookup falls back to the first entry; so does this one
        # (a plain prompt's single entry serves every call).
        return self.entries[0][1]
