"""The add-on files one Engine uses, and what a job takes from them.

- LoRAs: `<lora:NAME:WEIGHT>` tags of the prompt (resolved in the LoRA folder by file name or the
  training run's name, as the web UI does) plus LoRA files given by path, patched into the weights
  before the job (the same set as the last job's costs nothing) and removed when a job asks for
  another set, leaving the base weights bit-identical.
- Textual-inversion embeddings from the embeddings folder, read once, each checked against the
  text encoder's width.
- A replacement VAE: a file given at load, or one of the VAE folder's by name (the web UI's sd_vae);
  "Automatic" / "None" put the checkpoint's own VAE back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..checkpoint.sources import SINGLE_FILE_SUFFIXES
from ..detect import CheckpointError
from ..models import StableDiffusionModel
from ..prompts import extract_networks, lora_weights
from .embeddings import Embedding, check_width, read_embeddings_dir
from .lora import LoraFile, LoraPatcher, infotext_hashes, read_lora
from .vae_files import read_vae_file, replace_vae, vae_hash

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


@dataclass(frozen=True)
class UsedLora:
    name: str  # as the prompt (or the file name) says it
    lora: LoraFile
    te_weight: float
    unet_weight: float


def lora_files(folder: Path | None) -> dict[str, Path]:
    """A LoRA folder's files by the names a prompt can use (file name; a training name also works)."""
    if folder is None:
        return {}
    return {p.stem: p for p in sorted(folder.rglob("*")) if p.suffix.lower() in LORA_SUFFIXES}


def vae_files(folder: Path | None) -> dict[str, Path]:
    """A VAE folder's files by file name (the web UI's sd_vae values)."""
    if folder is None:
        return {}
    return {p.name: p for p in sorted(folder.rglob("*")) if p.suffix.lower() in SINGLE_FILE_SUFFIXES}


class Addons:
    def __init__(self, model: StableDiffusionModel, lora_dir: str | Path | None = None,
                 embeddings_dir: str | Path | None = None, vae_dir: str | Path | None = None,
                 checkpoint: Path | None = None):
        self.model = model
        self.checkpoint = checkpoint  # where the model's own VAE can be read back from
        self.vae_dir = Path(vae_dir) if vae_dir is not None else None
        if self.vae_dir is not None and not self.vae_dir.is_dir():
            raise CheckpointError(f"VAE folder '{self.vae_dir}' not found")
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        if self.lora_dir is not None and not self.lora_dir.is_dir():
            raise CheckpointError(f"LoRA folder '{self.lora_dir}' not found")
        self.patcher = LoraPatcher(model)
        self._files: dict[Path, tuple[float, LoraFile]] = {}  # path -> (mtime, parsed file)
        self.embeddings: dict[str, Embedding] = {}
        if embeddings_dir is not None:
            self.embeddings = read_embeddings_dir(embeddings_dir)
            for emb in self.embeddings.values():
                check_width(emb, model.cfg.text.width)
        self.vae: tuple[str, str] | None = None  # (name, hash) of a replacement VAE, for the infotext

    # --- LoRA -------------------------------------------------------------------------------------
    def lora_files(self) -> dict[str, Path]:
        return lora_files(self.lora_dir)

    def _read(self, path: Path) -> LoraFile:
        mtime = path.stat().st_mtime if path.exists() else 0.0
        cached = self._files.get(path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, read_lora(path))
            self._files[path] = cached
        return cached[1]

    def _find(self, name: str) -> Path:
        files = self.lora_files()
        if name in files:
            return files[name]
        for path in files.values():  # the web UI also accepts the name the file was trained under
            if self._read(path).alias == name:
                return path
        where = f"in {self.lora_dir}" if self.lora_dir else "(no LoRA folder was given: --lora-dir)"
        raise ValueError(f"unknown LoRA '{name}' {where}")

    def loras_for(self, prompt: str, files: Sequence[tuple[str, float]] = ()) -> list[UsedLora]:
        """The prompt's <lora:...> tags, then the files given by path (weight for both networks)."""
        used = []
        for tag in extract_networks(prompt)[1]:
            if tag.kind not in ("lora", "lyco"):
                raise ValueError(f"<{tag.kind}:...>: only <lora:...> extra networks are supported")
            te, unet = lora_weights(tag)
            used.append(UsedLora(tag.name, self._read(self._find(tag.name)), te, unet))
        for path, weight in files:
            lora = self._read(Path(path))
            used.append(UsedLora(lora.name, lora, weight, weight))
        return used

    def apply(self, prompt: str, files: Sequence[tuple[str, float]] = ()) -> dict[str, object]:
        """Patch the job's LoRAs in (removing the last job's), and say so for the infotext."""
        used = self.loras_for(prompt, files)
        self.patcher.apply([(u.lora, u.te_weight, u.unet_weight) for u in used])
        return {"Lora hashes": infotext_hashes((u.name, u.lora) for u in used)} if used else {}

    # --- VAE --------------------------------------------------------------------------------------
    def set_vae(self, path: str | Path) -> None:
        replace_vae(self.model, read_vae_file(path))
        self.vae = (Path(path).stem if Path(path).is_file() else Path(path).name, vae_hash(path))

    def vae_files(self) -> dict[str, Path]:
        return vae_files(self.vae_dir)

    def use_vae(self, name: str | None) -> None:
        """A VAE of the folder by file name; None, "Automatic" or "None": the checkpoint's own."""
        if name in (None, "Automatic", "None"):
            if self.vae is not None:
                if self.checkpoint is None:
                    raise ValueError("the model's own VAE cannot be read back (it was not loaded from a file)")
                replace_vae(self.model, read_vae_file(self.checkpoint))
                self.vae = None
            return
        files = self.vae_files()
        if name not in files:
            where = f"in {self.vae_dir}" if self.vae_dir else "(no VAE folder was given: --vae-dir)"
            raise ValueError(f"unknown VAE '{name}' {where}; choose from {', '.join(files) or 'none'}")
        if self.vae is None or self.vae[0] != files[name].stem:
            self.set_vae(files[name])
