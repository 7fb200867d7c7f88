"""VAE files people bring, read to `first_stage_model.*` keys, and swapped into a loaded model.

Sources: a VAE-only file in the original layout (`vae-ft-mse-840000-ema-pruned.safetensors` /
`.ckpt`: `encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`, sometimes under
`first_stage_model.`, with training extras `loss.*` / `model_ema.*` that are dropped, as the web
UI drops them); a diffusers `AutoencoderKL` (a folder with `config.json`, a pipeline folder's
`vae/`, or its weights file alone), converted by the one table in `diffusers_keys`; or a full
checkpoint, whose baked VAE is taken (which also restores a model's own VAE).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from ..checkpoint.files import Remapped, read_tensors, release, shapes_of, shown_keys
from ..checkpoint.load import file_sha256
from ..checkpoint.sources import SINGLE_FILE_SUFFIXES, _component_weights, _json
from ..detect import VAE, CheckpointError, Hints, detect_vae
from ..diffusers_keys import same, vae_to_ldm
from ..models import StableDiffusionModel

VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
TRAINING_EXTRAS = ("loss.", "model_ema.")  # discriminator / EMA state saved next to the autoencoder
SHORT_HASH = 10  # hex digits of the file's sha256 in the web UI's "VAE hash" infotext


def _from_original(sd: Mapping[str, torch.Tensor], name: str) -> Mapping[str, torch.Tensor]:
    """Original-layout keys, bare or under `first_stage_model.` (a full checkpoint or a prefixed VAE)."""
    if any(k.startswith(VAE) for k in sd):
        # Everything else in a full checkpoint (UNet, text encoder, schedule buffers) is not ours to read.
        keys = {k: k for k in sd if k.startswith(VAE) and not k.startswith(VAE + "loss.")}
    else:
        keys = {VAE + k: k for k in sd if not k.startswith(TRAINING_EXTRAS)}
        stray = sorted(k for k in keys.values() if not k.startswith(VAE_PARTS))
        if len(stray) == len(keys):
            raise CheckpointError(
                f"{name}: not a VAE file: no encoder.*/decoder.* keys "
                f"(found {len(sd)} keys, e.g. {shown_keys(list(sd)[:3]) or 'none'})"
            )
        if stray:  # a VAE file with other networks in it: refuse rather than guess what it is
            raise CheckpointError(f"{name}: keys that belong to no part of a VAE: {shown_keys(stray)}")
    if not any(k.startswith(VAE + "decoder.") for k in keys):
        raise CheckpointError(f"{name}: no VAE in it (no 'first_stage_model.decoder.*' keys)")
    return Remapped([(sd, {new: ((old,), same) for new, old in keys.items()})])


def _from_diffusers(sd: Mapping[str, torch.Tensor], levels: int | None) -> Mapping[str, torch.Tensor]:
    if levels is None:  # a weights file without its config: the block numbers tell the level count
        blocks = re.compile(r"(?:encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.")
        levels = 1 + max(int(m.group(1)) for k in sd if (m := blocks.match(k)))
    return Remapped([(sd, vae_to_ldm(sd, levels))])


def _is_diffusers(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd)


def read_vae_file(path: str | Path) -> Mapping[str, torch.Tensor]:
    """VAE tensors under `first_stage_model.*` keys, read lazily from any of the sources above."""
    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path  # a whole pipeline folder
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{path}: not a diffusers VAE folder (config.json is missing)")
        conf = _json(folder / "config.json")
        if "block_out_channels" not in conf or conf.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise CheckpointError(f"{folder / 'config.json'}: not an AutoencoderKL config")
        sd = read_tensors(_component_weights(folder, ("diffusion_pytorch_model",)))
        return _from_diffusers(sd, len(conf["block_out_channels"]))
    if not path.is_file():
        raise CheckpointError(f"VAE '{path}' not found: give a .safetensors/.ckpt/.pt file or a diffusers folder")
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"{path.name}: unknown VAE file type; expected one of {', '.join(SINGLE_FILE_SUFFIXES)}")
    sd = read_tensors(path)
    return _from_diffusers(sd, None) if _is_diffusers(sd) else _from_original(sd, path.name)


def _describe(sd: Mapping[str, torch.Tensor]) -> str:
    """A VAE's sizes in words, from its keys and shapes; "unknown sizes" where they do not tell."""
    try:
        v = detect_vae(sd, Hints())
    except CheckpointError:
        return "unknown sizes"
    return f"{v.ch} base channels, multipliers {v.ch_mult}, {v.z_channels} latent channels"


def replace_vae(model: StableDiffusionModel, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy `first_stage_model.*` tensors into `model.first_stage_model`, in its dtype and device.

    Keys and shapes are checked first, strictly, so a VAE that does not fit leaves the model as it was.
    """
    params = {VAE + k: v for k, v in model.first_stage_model.state_dict().items()}
    shapes = shapes_of(tensors)
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    wrong = [f"{k}: file {tuple(shapes[k].shape)} vs model {tuple(params[k].shape)}"
             for k in params if k in shapes and shapes[k].shape != params[k].shape]
    problems = [f"{label}: {shown_keys(items)}" for label, items in
                (("wrongly shaped keys", wrong), ("missing keys", missing), ("unexpected keys", unexpected)) if items]
    if problems:
        sizes = f" (this VAE: {_describe(shapes)}; the model's: {_describe(params)})" if wrong else ""
        raise CheckpointError(f"this VAE does not fit the {model.cfg.name} model's VAE{sizes}: " + "; ".join(problems))
    with torch.no_grad():
        for k, p in params.items():  # in place: whatever holds the modules sees the new weights
            p.copy_(tensors[k])
            release(tensors, k)


def vae_hash(path: str | Path) -> str:
    """The web UI's "VAE hash": the file's sha256, 10 hex digits (a folder: its weights file's)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        path = _component_weights(folder, ("diffusion_pytorch_model",))
    if not path.is_file():
        raise CheckpointError(f"VAE '{path}' not found")
    return file_sha256(path)[:SHORT_HASH]
