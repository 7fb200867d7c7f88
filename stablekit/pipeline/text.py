"""Prompts -> conditioning, as the popular web UI encodes them.

Order of operations (the web UI's): extra-network tags are cut out; the prompt is expanded into
one plain text per prompt-editing step; each text is parsed for emphasis and split into 75-token
chunks (BREAK, the comma back-off, textual-inversion embeddings kept whole); chunk position k of
every text is encoded as one batch, weighted by emphasis, and the chunks are concatenated along
the token axis. The result is a CondSchedule: the conditioning of each denoiser call.

Emphasis modes: original (the web UI's default: multiply each token's hidden state by its weight,
then rescale so the mean over everything encoded together - all schedule texts of the prompt -
is the unweighted mean), no-norm (multiply only), ignore (parse, drop the weights), none (no
parsing: brackets are literal text).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

import torch

from ..addons.embeddings import Embedding
from ..diffusion.cond import Cond, CondSchedule
from ..prompts import extract_networks, parse_prompt_attention, prompt_schedules, tokenize_line
from ..prompts.chunks import bpe_tokenize

if TYPE_CHECKING:  # conditioning.py imports this module
    from .conditioning import TaskContext



@dataclass(frozen=True)
class TextSettings:
    """How prompts are read: clip skip, emphasis mode and the textual-inversion embeddings by trigger word."""

    clip_skip: int = 1
    emphasis: str = "original"
    embeddings: Mapping[str, Embedding] = field(default_factory=dict)


class EmbeddingFinder:
    """The chunker's hook: finds a trigger word's BPE ids at a position (the longest trigger wins)."""

    def __init__(self, embeddings: Mapping[str, Embedding], encode: Callable[[str], list[int]]):
        self.by_first: dict[int, list[tuple[list[int], Embedding]]] = {}
        for name, emb in embeddings.items():
            ids = encode(name)
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, emb))
        for options in self.by_first.values():
            options.sort(key=lambda o: -len(o[0]))
        self.used: dict[str, Embedding] = {}

    def __call__(self, ids: list[int], position: int) -> tuple[Embedding, int, int] | None:
        for trigger, emb in self.by_first.get(ids[position], ()):
            if ids[position : position + len(trigger)] == trigger:
                self.used[emb.name] = emb
                return emb, emb.num_vectors, len(trigger)
        return None


def _parse(text: str, emphasis: str) -> list[tuple[str, float]]:
    if emphasis == "none":
        return [(text, 1.0)]
    parsed = parse_prompt_attention(text)
    if emphasis == "ignore":  # BREAK (weight -1) still splits chunks
        return [(t, w if w == -1 else 1.0) for t, w in parsed]
    return parsed


def emphasize(z: torch.Tensor, multipliers: torch.Tensor, mode: str) -> torch.Tensor:
    """z [R, 77, C] of one chunk position, multipliers [R, 77] -> weighted z (see the module docstring)."""
    if mode not in ("original", "no-norm") or bool((multipliers == 1).all()):
        return z  # nothing weighted: the web UI's rescale is by exactly 1 there
    weighted = z.float() * multipliers[..., None]
    new_mean = weighted.mean()
    if mode == "original" and new_mean != 0:  # one scalar mean over the whole batch encoded together, as there
        weighted = weighted * (z.float().mean() / new_mean)  # (a zero mean, as in zero-bias test weights: no rescale)
    return weighted.to(z.dtype)


@torch.inference_mode()
def encode_texts(ctx: TaskContext, texts: list[str], settings: TextSettings, found: EmbeddingFinder | None = None,
                 ) -> torch.Tensor:
    """Plain texts (no tags, no schedules) -> cross-attention tokens [len(texts), 77 * chunks, C]."""
    tokenizer, encoder = ctx.tokenizer, ctx.model.text_encoder
    found = found or EmbeddingFinder(settings.embeddings, tokenizer.encode)
    chunked = [tokenize_line(_parse(t, settings.emphasis), bpe_tokenize(tokenizer), pad_id=tokenizer.pad_id,
                             find_embedding=found) for t in texts]
    empty = tokenize_line([("", 1.0)], bpe_tokenize(tokenizer), pad_id=tokenizer.pad_id).chunks[0]
    device = next(encoder.parameters()).device
    out = []
    for k in range(max(len(c.chunks) for c in chunked)):  # shorter texts get empty chunks, as there
        rows = [c.chunks[k] if k < len(c.chunks) else empty for c in chunked]
        vectors = [(r, offset + 1, emb.vectors.to(device))  # +1: the offsets do not count BOS
                   for r, c in enumerate(chunked) if k < len(c.fixes) for offset, emb in c.fixes[k]]
        ids = torch.tensor([tokens for tokens, _ in rows], device=device)
        multipliers = torch.tensor([m for _, m in rows], device=device, dtype=torch.float32)
        z = encoder(ids, clip_skip=settings.clip_skip, vectors=vectors)
        out.append(emphasize(z, multipliers, settings.emphasis))
    return torch.cat(out, dim=1)


def prompt_text(prompt: str) -> str:
    """The prompt without its extra-network tags (<lora:...>), which are applied to the weights instead."""
    return extract_networks(prompt)[0]


def encode_prompt(ctx: TaskContext, prompt: str, batch: int, steps: int, settings: TextSettings,
                  concat: torch.Tensor | None = None, vector: torch.Tensor | None = None,
                  after: int | None = None) -> tuple[CondSchedule, dict[str, Embedding]]:
    """A prompt (without tags) -> its CondSchedule for a batch of `batch` (steps: the schedule's
    length in denoiser calls) and the embeddings it used (for the infotext's TI hashes). `concat`
    and `vector` (the model kind's extra channels and vector input) go into every entry. `after`: the
    calls of the pass this one continues (hires fix), where the prompt-editing timeline goes on."""
    if after is None:
        schedule = prompt_schedules([prompt], steps)[0]  # [(last step, text)]
    else:
        schedule = prompt_schedules([prompt], after, hires_steps=steps)[0]
    found = EmbeddingFinder(settings.embeddings, ctx.tokenizer.encode)
    z = encode_texts(ctx, [text for _, text in schedule], settings, found)
    entries = tuple((last, Cond(z[i : i + 1].expand(batch, -1, -1), vector, concat))
                    for i, (last, _) in enumerate(schedule))
    return CondSchedule(entries), found.used
