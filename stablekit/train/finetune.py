"""Fine-tuning a Stable Diffusion checkpoint on a folder of captioned pictures (full UNet, optionally text).

Pictures are fitted to a square of `size` (crop-and-resize) and encoded by the model's own VAE
each step (the latent mean, as the pipeline encodes). The result is exported in the original
single-file layout, so it loads like any downloaded checkpoint. Meant for a GPU: on a CPU a
512x512 step of SD 1.5 takes about a minute.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import LoadedModel, load_model
from ..engine import resolve_device
from .common import StageConfig
from .data import captioned_batches, captioned_pictures
from .latent import train_latent_diffusion


def finetune(model: str | Path, data: Path, out: Path, *, steps: int, batch_size: int, lr: float,
             size: int | None = None, train_text_encoder: bool = False, device: str = "auto",
             prediction: str | None = None, seed: int = 0, caption_dropout: float = 0.1, flip: bool = False,
             buckets: bool = False,
             ema: float = 0.0, gradient_checkpointing: bool = False,
             autocast: torch.dtype | None = None) -> Path:
    dev = resolve_device(device)
    pairs = captioned_pictures(data)
    loaded = load_model(model, dtype=torch.float32, device=dev, prediction=prediction)
    sd_model = loaded.model
    size = size or loaded.config.resolution
    batches = captioned_batches(pairs, sd_model.vae, size, batch_size, seed, dev, flip, buckets)
    stage = StageConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=min(100, steps // 10 + 1),
                        weight_decay=1e-2, sample_every=max(steps // 4, 1), seed=seed, ema=ema)
    train_latent_diffusion(sd_model, batches, stage, out, gradient_checkpointing=gradient_checkpointing,
                           autocast=autocast, caption_dropout=caption_dropout, offset_noise=0.0,
                           train_text_encoder=train_text_encoder, preview_prompts=[c for _, c in pairs[:2]],
                           preview_size=(size, size), device=dev)
    return export_checkpoint(loaded, out / "finetuned.safetensors")


def export_checkpoint(loaded: LoadedModel, path: Path) -> Path:
    """The model as an original-layout single file, with the source's .yaml beside it when it had one."""
    save_file({k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}, str(path))
    source_yaml = loaded.path.with_suffix(".yaml") if loaded.path and loaded.path.is_file() else None
    if source_yaml and source_yaml.is_file():  # what the weights cannot tell stays true of the result
        path.with_suffix(".yaml").write_text(source_yaml.read_text())
    return path
