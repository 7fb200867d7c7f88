"""Loading: resolve -> read -> detect -> build on the meta device -> strict load in the target dtype."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

import torch

from ..config import ModelConfig, Prediction
from ..detect import CheckpointError, detect, unused_keys, upscaler_hints
from ..models import StableDiffusionModel
from ..models.meta import empty_modules
from ..models.preview_fit import with_preview
from .files import read_tensors, release, shapes_of
from .sources import SINGLE_FILE_SUFFIXES, read_diffusers_folder, resolve, yaml_hints


@dataclass
class LoadedModel:
    model: StableDiffusionModel
    config: ModelConfig
    name: str  # shown in infotext as "Model"
    path: Path | None  # the file or folder the weights came from
    notes: list[str] = field(default_factory=list)  # how detection decided, for the user
    _hash: str | None = None

    @property
    def short_hash(self) -> str | None:
        """A1111's "Model hash": the first 10 hex digits of the file's sha256 (single files only)."""
        if self._hash is None and self.path is not None and self.path.is_file():
            self._hash = file_sha256(self.path)[:10]
        return self._hash


def cache_dir() -> Path:
    """stablekit's folder in the user cache (XDG_CACHE_HOME, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stablekit"


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file, remembered in the user cache by path, size and mtime (a 4 GB file takes seconds)."""
    cache_file = cache_dir() / "hashes.json"
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        cache[key] = h.hexdigest()
        try:  # the cache is a convenience: failing to write it never fails a generation
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(cache, indent=0))
        except OSError:
            pass
    return cache[key]


@dataclass
class OpenedCheckpoint:
    """A checkpoint read as far as detection: its config and lazily readable tensors."""

    config: ModelConfig
    tensors: Mapping[str, torch.Tensor]
    name: str
    path: Path
    notes: list[str]


def open_checkpoint(
    spec: str | Path, *, prediction: Prediction | None = None, zero_terminal_snr: bool | None = None
) -> OpenedCheckpoint:
    """Find the files, read keys and shapes, detect the model.

    Safetensors weights are not read here (only their headers); pickles are read whole by torch.load.
    """
    path = resolve(spec)
    notes: list[str] = []
    if path.is_dir():
        sd, hints, notes = read_diffusers_folder(path)
    elif path.suffix in SINGLE_FILE_SUFFIXES:
        sd = read_tensors(path)
        hints, notes = yaml_hints(path)
        notes.insert(0, f"format: single file ({path.suffix})")
    else:
        raise CheckpointError(f"{path.name}: unknown checkpoint type; expected one of {', '.join(SINGLE_FILE_SUFFIXES)} or a folder")
    if prediction is not None:
        hints = replace(hints, prediction=prediction, prediction_source="--prediction")
    shapes = shapes_of(sd)
    hints, filled = upscaler_hints(shapes, hints)  # an upscaler's missing facts, from its published config
    notes += filled
    cfg = detect(shapes, hints)
    if hints.latent_size:
        cfg = replace(cfg, resolution=hints.latent_size * cfg.vae.downscale)
    source = hints.prediction_source or "default; weights cannot tell, use --prediction v or a .yaml for v-models"
    notes.append(f"prediction: {cfg.prediction} ({source})")
    if zero_terminal_snr is not None:
        cfg = replace(cfg, schedule=replace(cfg.schedule, zero_terminal_snr=zero_terminal_snr))
    if cfg.schedule.zero_terminal_snr:
        notes.append("schedule: zero terminal SNR (" + ("flag" if zero_terminal_snr else "scheduler config") + ")")
    if not (hints.unet_num_heads or hints.unet_num_head_channels):
        u = cfg.unet
        heads = f"{u.num_heads} heads" if u.num_heads > 0 else f"{u.num_head_channels} channels per head"
        notes.append(f"attention: {heads} (the {cfg.family.upper()} convention; a .yaml can say otherwise)")
    return OpenedCheckpoint(cfg, sd, path.stem if path.is_file() else path.name, path, notes)


def load_model(
    spec: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    prediction: Prediction | None = None,
    zero_terminal_snr: bool | None = None,
) -> LoadedModel:
    """Read, detect and build a model; weights go straight to `dtype` on `device`."""
    ckpt = open_checkpoint(spec, prediction=prediction, zero_terminal_snr=zero_terminal_snr)
    model = build_and_load(ckpt.config, ckpt.tensors, dtype=dtype, device=device)
    vae, note = with_preview(ckpt.config.vae, model.vae)
    cfg = replace(ckpt.config, vae=vae)
    return LoadedModel(model, cfg, ckpt.name, ckpt.path, ckpt.notes + ([note] if note else []))


def build_and_load(
    cfg: ModelConfig, sd: Mapping[str, torch.Tensor], *, dtype: torch.dtype, device: torch.device | str
) -> StableDiffusionModel:
    """Build modules without memory (meta device), check keys and shapes, then assign the weights."""
    with empty_modules():
        model = StableDiffusionModel(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    present = [k for k in sd if not unused_keys(k, cfg)]
    shapes = shapes_of(sd)
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    wrong = [f"{k}: file {tuple(shapes[k].shape)} vs model {tuple(expected[k])}"
             for k in present if k in expected and tuple(shapes[k].shape) != tuple(expected[k])]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrongly shaped keys", wrong)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"checkpoint does not match the detected {cfg.name} model: " + "; ".join(problems))
    weights = {}
    for k in present:  # one tensor at a time: the target-dtype copy is the only full copy
        t = sd[k]
        weights[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        if weights[k].data_ptr() != t.data_ptr():  # copied: the file's pages for it can go
            release(sd, k)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.requires_grad_(False).eval()
