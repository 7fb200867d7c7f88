"""Fine-tuning a Stable Diffusion checkpoint on a folder of captioned pictures (full UNet, optionally text).

Pictures are fitted to a square of `size` (crop-and-resize) and encoded by the model's own VAE
each step (the latent mean, as the pipeline encodes). The result is exported in the original
single-file layout, so it loads like any downloaded checkpoint. Meant for a GPU: on a CPU a
512x512 step of SD 1.5 takes about a minute.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import load_model
from ..engine import resolve_device
from ..images import fit_picture, load_picture, to_tensor
from .common import StageConfig
from .latent import train_latent_diffusion

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def captioned_pictures(folder: Path) -> list[tuple[Path, str]]:
    """(picture, caption) pairs: every picture with a same-name .txt beside it; clear errors otherwise."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    pairs = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in PICTURE_SUFFIXES:
            text = path.with_suffix(".txt")
            if not text.is_file():
                raise ValueError(f"{path.name} has no caption file {text.name}")
            pairs.append((path, text.read_text(encoding="utf-8").strip()))
    if not pairs:
        raise ValueError(f"{folder}: no pictures ({', '.join(PICTURE_SUFFIXES)}) with .txt captions")
    return pairs


def finetune(model: str | Path, data: Path, out: Path, *, steps: int, batch_size: int, lr: float,
             size: int | None = None, train_text_encoder: bool = False, device: str = "auto",
             prediction: str | None = None, seed: int = 0) -> Path:
    dev = resolve_device(device)
    pairs = captioned_pictures(data)
    loaded = load_model(model, dtype=torch.float32, device=dev, prediction=prediction)
    sd_model = loaded.model
    size = size or loaded.config.resolution
    if size % 8:
        raise ValueError(f"--size must be a multiple of 8, got {size}")
    vae = sd_model.vae

    latents: dict[Path, torch.Tensor] = {}  # each picture is read and encoded once: the fit is deterministic

    @torch.no_grad()
    def latent_of(path: Path) -> torch.Tensor:
        if path not in latents:
            picture = to_tensor(fit_picture(load_picture(path), size, size, "crop-and-resize")).to(dev)
            latents[path] = vae.encode(picture * 2 - 1)[0] * vae.cfg.scale_factor  # [1, 4, size/8, size/8]
        return latents[path]

    def batches(step: int) -> tuple[torch.Tensor, list[str]]:
        rng = random.Random(seed * 1_000_003 + step)
        chosen = [rng.choice(pairs) for _ in range(batch_size)]
        return torch.cat([latent_of(p) for p, _ in chosen]), [c for _, c in chosen]

    stage = StageConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=min(100, steps // 10 + 1),
                        weight_decay=1e-2, sample_every=max(steps // 4, 1), seed=seed)
    train_latent_diffusion(sd_model, batches, stage, out, caption_dropout=0.1, offset_noise=0.0,
                           train_text_encoder=train_text_encoder, preview_prompts=[c for _, c in pairs[:2]],
                           preview_size=(size, size), device=dev)
    path = out / "finetuned.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in sd_model.state_dict().items()}, str(path))
    source_yaml = loaded.path.with_suffix(".yaml") if loaded.path and loaded.path.is_file() else None
    if source_yaml and source_yaml.is_file():  # what the weights cannot tell stays true of the result
        path.with_suffix(".yaml").write_text(source_yaml.read_text())
    return path
