"""Cond: everything that conditions one UNet call besides the noisy latent and the timestep.

One value travels from the task through the denoiser wrappers into the network, so new kinds of
conditioning (a pooled vector, a depth channel, a noise level) add a slot here, not a positional
argument to every signature.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class ControlInput:
    """One ControlNet's share of a batch of B: what it needs besides the UNet's own inputs.

    net:    (x, hint, t, cond) -> residuals, one per UNet input block, then the middle block's.
    hint:   [B, c, H, W] the control map at picture resolution (RGB in [0, 1]).
    scales: [B, n residuals] float, per row: the weight times the control mode's per-block factors;
            an all-zero row (the negative prompt's in "ControlNet is more important") gets none.
    active: whether the current sampling step lies in the control's start..end window.
    """

    net: Callable[..., list[torch.Tensor]]
    hint: torch.Tensor
    scales: torch.Tensor
    active: Callable[[], bool]

    def batchable_with(self, other: ControlInput) -> bool:
        return (self.net is other.net and self.active is other.active
                and self.hint.shape[1:] == other.hint.shape[1:] and self.scales.shape[1:] == other.scales.shape[1:])

    @staticmethod
    def cat(inputs: Sequence[ControlInput]) -> ControlInput:
        first = inputs[0]
        return replace(first, hint=torch.cat([i.hint for i in inputs]), scales=torch.cat([i.scales for i in inputs]))


@dataclass(frozen=True)
class Cond:
    """Conditioning for a batch of B.

    crossattn: [B, T, C] text tokens the UNet attends to (T = 77 per prompt chunk).
    vector:    [B, D] float (LDM `adm`: pooled text, size conditioning) or [B] long (class labels,
               the x4 upscaler's noise level); added to the time embedding. None: no vector input.
    concat:    [B, c, h, w] extra input channels after the latent (inpainting: mask + masked-picture
               latent; depth; the low-resolution picture). None: a base model.
    control:   the ControlNets' inputs (ControlledUNet adds their residuals); () for none.
    """

    crossattn: torch.Tensor
    vector: torch.Tensor | None = None
    concat: torch.Tensor | None = None
    control: tuple[ControlInput, ...] = ()

    @property
    def batch_size(self) -> int:
        return self.crossattn.shape[0]

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.crossattn, self.vector, self.concat

    def batchable_with(self, other: Cond) -> bool:
        """Whether the two can run as one batch: the same parts, each of the same shape past the batch."""
        return all(
            (a is None and b is None) or (a is not None and b is not None and a.shape[1:] == b.shape[1:])
            for a, b in zip(self._tensors(), other._tensors())
        ) and len(self.control) == len(other.control) and all(
            a.batchable_with(b) for a, b in zip(self.control, other.control))

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        """One Cond for the batches one after another (they must be batchable with each other)."""
        first = conds[0]
        if not all(first.batchable_with(c) for c in conds[1:]):
            raise ValueError("conditionings of different shapes cannot be batched; run them as separate calls")
        parts = zip(*(c._tensors() for c in conds))
        control = tuple(ControlInput.cat(group) for group in zip(*(c.control for c in conds)))
        return Cond(*(None if p[0] is None else torch.cat(p) for p in parts), control=control)

    def to(self, dtype: torch.dtype) -> Cond:
        """Floating-point parts in `dtype` (the network's); integer class labels stay as they are."""
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(dtype) if t is not None and t.is_floating_point() else t
        control = tuple(replace(c, hint=c.hint.to(dtype)) for c in self.control)
        return Cond(*(cast(p) for p in self._tensors()), control=control)


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

    def map(self, f: Callable[[Cond], Cond]) -> CondSchedule:
        """The same timeline with each entry's Cond changed by `f` (e.g. ControlNet maps added)."""
        return CondSchedule(tuple((last, f(cond)) for last, cond in self.entries))

    def at(self, call: int) -> Cond:
        for last, cond in self.entries:
            if call <= last:
                return cond
        # Past the schedule's end the web UI's lookup falls back to the first entry; so does this one
        # (a plain prompt's single entry serves every call).
        return self.entries[0][1]
