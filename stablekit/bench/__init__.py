"""stablekit and diffusers side by side on the same random weights, inputs and thread count.

    python -m stablekit.bench                                   # SD 1.5 shapes: text, unet, vae, txt2img, large
    python -m stablekit.bench --parts unet vae --dtype bf16 --repeats 3
    python -m stablekit.bench --shapes demo --size 64 --steps 2 --repeats 1 --large-size 128   # seconds

No downloads: random weights with the exact SD 1.5 shapes are written once as a single-file
checkpoint (cached), and diffusers' own converters make a pipeline folder from that file. Each
(side, part, dtype) runs in its own process so its peak resident memory is its own; times are
medians after a warm-up. Parts: text (tokenizer + CLIP, batch 2), unet (one CFG step: batch 2),
vae (decode to size x size), txt2img (the whole picture: Euler, CFG 7), lora (the same with a
rank-16 LoRA on the UNet's attention, merged once: its cost per picture), large (a bf16 txt2img
at --large-size with VAE tiling: its peak memory). Prints one table and writes JSON.
"""

from __future__ import annotations

from .weights import random_checkpoint

__all__ = ["random_checkpoint"]
