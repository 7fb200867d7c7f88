"""Textual inversion (Gal et al. 2022): n new token vectors learned for a trigger word; nothing else trains.

Every caption names the trigger word (`--token zorp`: "a photo of zorp"); where it stands, the text
encoder's input gets the n learned vectors instead of token embeddings, through the same replacement
hook the pipeline uses for loaded embeddings, so the model's own embedding table is never written.
The vectors start from the init word's token embeddings, spread over n as the web UI does.

The result is the web UI's `.safetensors` embedding (`{"emb_params": [n, width]}`, named after the
token): put it in `--embeddings-dir` and write the token in a prompt; diffusers'
`load_textual_inversion` reads it too.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import load_model
from ..engine import resolve_device
from ..models.tokenizer import CLIPTokenizer
from .common import StageConfig
from .data import captioned_batches, captioned_pictures
from .latent import train_latent_diffusion


class LearnedVectors(nn.Module):
    def __init__(self, start: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(start.clone())


def initial_vectors(model: nn.Module, tokenizer: CLIPTokenizer, init_word: str, n: int) -> torch.Tensor:
    """[n, width]: the init word's token embeddings, vector i from token i * tokens // n (the web UI's rule)."""
    ids = tokenizer.encode(init_word) or tokenizer.encode("*")
    table = model.text_encoder.transformer.text_model.embeddings.token_embedding.weight.detach()
    embedded = table[torch.tensor(ids)]
    return torch.stack([embedded[i * len(ids) // n] for i in range(n)]).float()


def caption_ids(tokenizer: CLIPTokenizer, captions: list[str], token: str, n: int,
                ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Token ids [B, 77] with n placeholder positions wherever `token` stands, and those (row, start)."""
    pattern = re.compile(rf"(?<!\w){re.escape(token)}(?!\w)", re.IGNORECASE)
    ids = torch.full((len(captions), tokenizer.max_length), tokenizer.pad_id, dtype=torch.long)
    places = []
    for row, caption in enumerate(captions):
        pieces = pattern.split(caption)
        if len(pieces) < 2 and caption:
            raise ValueError(f"the caption {caption!r} does not name the token {token!r}")
        row_ids = [tokenizer.bos_id]
        for k, piece in enumerate(pieces):
            if k:
                places.append((row, len(row_ids)))
                row_ids += [tokenizer.eos_id] * n  # placeholders: the learned vectors replace them
            row_ids += tokenizer.encode(piece)
        row_ids.append(tokenizer.eos_id)
        if len(row_ids) > tokenizer.max_length:
            raise ValueError(f"the caption {caption!r} is longer than {tokenizer.max_length - 2} tokens")
        ids[row, : len(row_ids)] = torch.tensor(row_ids)
    return ids, places


def train_embedding(model: str | Path, data: Path, out: Path, token: str, *, steps: int, batch_size: int = 1,
                    lr: float = 5e-3, vectors: int = 1, init_word: str = "*", size: int | None = None,
                    device: str = "auto", prediction: str | None = None, seed: int = 0,
                    stop_after: int | None = None, caption_dropout: float = 0.0, flip: bool = False,
                    buckets: bool = False,
                    ema: float = 0.0, gradient_checkpointing: bool = False,
                    autocast: torch.dtype | None = None) -> Path | None:
    """Learn `vectors` vectors for `token` from captioned pictures; returns out/TOKEN.safetensors (None:
    stopped early by `stop_after`, resumable)."""
    if not re.fullmatch(r"[\w-]+", token):
        raise ValueError(f"--token must be one word (letters, digits, _ or -), got {token!r}")
    if vectors < 1:
        raise ValueError(f"--vectors must be at least 1, got {vectors}")
    dev = resolve_device(device)
    pairs = captioned_pictures(data)
    loaded = load_model(model, dtype=torch.float32, device=dev, prediction=prediction)
    sd_model = loaded.model
    if loaded.config.text.layout != "clip":
        raise ValueError("embedding training is for SD 1.x text encoders (CLIP ViT-L) here")
    tokenizer = CLIPTokenizer(pad_id=loaded.config.text.pad_id)
    for _, caption in pairs:  # a caption without the token is a clear error before any work
        caption_ids(tokenizer, [caption], token, vectors)
    learned = LearnedVectors(initial_vectors(sd_model, tokenizer, init_word, vectors)).to(dev)

    def encode(captions: list[str]) -> torch.Tensor:
        ids, places = caption_ids(tokenizer, captions, token, vectors)
        return sd_model.text_encoder(ids.to(dev), vectors=[(r, s, learned.vectors) for r, s in places])

    size = size or loaded.config.resolution
    batches = captioned_batches(pairs, sd_model.vae, size, batch_size, seed, dev, flip, buckets)
    stage = StageConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=min(100, steps // 10 + 1),
                        sample_every=max(steps // 4, 1), seed=seed, stop_after=stop_after, ema=ema)
    done = train_latent_diffusion(sd_model, batches, stage, out, gradient_checkpointing=gradient_checkpointing,
                                  autocast=autocast, caption_dropout=caption_dropout, offset_noise=0.0,
                                  trained={"embedding": learned}, encode_captions=encode, device=dev)
    if done < steps:
        return None
    path = out / f"{token}.safetensors"
    save_file({"emb_params": learned.vectors.detach().cpu().contiguous()}, str(path),
              metadata={"name": token, "step": str(steps), "sd_checkpoint_name": loaded.name})
    return path
