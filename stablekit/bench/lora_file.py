"""A random LoRA for the benchmark's `lora` part: rank-R adapters on every attention projection of the
UNet, in kohya's format. Module names are diffusers' when a diffusers folder is there to read them
from (diffusers reads only those for SD 1.x), else the original ones (stablekit reads both)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint.files import read_tensors, shapes_of

RANK = 16
# [model.diffusion_model.]<blocks>.transformer_blocks.N.attnK.to_q|to_k|to_v|to_out.0 .weight
_ATTENTION = re.compile(r"(?:model\.diffusion_model\.)?(.+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0))\.weight")


def random_lora(checkpoint: Path, folder: Path | None, path: Path, rank: int = RANK) -> Path:
    """Write (once) a kohya LoRA for the model's UNet attention; alpha = rank, so the scale is 1."""
    if path.exists():
        return path
    g = torch.Generator().manual_seed(7)
    tensors = {}
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors" if folder else checkpoint
    for key, meta in shapes_of(read_tensors(unet)).items():
        m = _ATTENTION.fullmatch(key)
        if m is None:
            continue
        out_dim, in_dim = meta.shape
        name = "lora_unet_" + m.group(1).replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_dim, generator=g) / in_dim**0.5
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_dim, rank, generator=g) * (0.1 / rank**0.5)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
