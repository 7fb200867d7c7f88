"""Textual-inversion embeddings (Gal et al. 2022): files holding n learned token vectors.

Formats read, as the AUTOMATIC1111 web UI reads them (`create_embedding_from_data`):
- the web UI's `.pt`: `{"string_to_param": {"*": Tensor[n, dim]}, "name", "step", ...}`;
- one tensor in a dict: diffusers' `learned_embeds` `{token: Tensor[n, dim] or [dim]}` (`.bin` or
  `.safetensors`) and `{"emb_params": Tensor[n, dim]}` `.safetensors` files.
Pickles go through the weights-only loader, so a `.pt` that would run code is refused unexecuted.
The trigger word is the file's stem, whatever name the file stores (the web UI's rule).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..checkpoint.files import read_tensors
from ..checkpoint.load import file_sha256
from ..detect import CheckpointError

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")  # the web UI's; images with embedded data are not read
SHORT_HASH = 12  # hex digits of the file's sha256 in the web UI's "TI hashes" infotext


@dataclass(frozen=True, eq=False)
class Embedding:
    name: str  # the trigger word: the file's stem
    vectors: torch.Tensor  # [n, dim] float32
    path: Path
    hash: str  # sha256 of the file, first 12 hex digits ("TI hashes: name: <hash>")
    step: int | None = None  # training step, where the file records it

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def num_vectors(self) -> int:
        return self.vectors.shape[0]


def _read_pickle(path: Path) -> object:
    """A weights-only unpickle that, unlike read_tensors, keeps the web UI's non-tensor fields."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # Same loader again through the shared reader, so the message (a pickle that would run
        # code, a damaged file) is worded in one place; it raises for the same reason.
        read_tensors(path)
        raise


def _the_tensor(data: object, name: str) -> torch.Tensor:
    """The one tensor of an embedding file, by the web UI's rules, in order."""
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{name}: not a textual-inversion embedding (the file holds a {type(data).__name__})")
    if "string_to_param" in data:  # the web UI's own format
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            count = len(params) if isinstance(params, Mapping) else "no"
            raise CheckpointError(f"{name}: 'string_to_param' must hold exactly one tensor; it holds {count}")
        tensor = next(iter(params.values()))
    elif "clip_g" in data and "clip_l" in data:
        raise CheckpointError(f"{name}: an SDXL embedding (clip_g + clip_l); stablekit runs SD 1.x and 2.x models")
    elif len(data) == 1:  # diffusers' learned_embeds {token: T} and {"emb_params": T}
        tensor = next(iter(data.values()))
    else:
        keys = ", ".join(map(str, list(data)[:5])) or "none"
        raise CheckpointError(
            f"{name}: not a textual-inversion embedding: expected 'string_to_param' (web UI .pt) or a single "
            f"tensor (diffusers learned_embeds, emb_params); found {len(data)} keys ({keys})"
        )
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise CheckpointError(f"{name}: the embedding is not a floating-point tensor")
    if tensor.ndim == 1:  # old diffusers files store a single vector as [dim]
        tensor = tensor[None]
    if tensor.ndim != 2 or 0 in tensor.shape:
        raise CheckpointError(f"{name}: embedding vectors have shape {tuple(tensor.shape)}; expected [n, dim]")
    return tensor


def read_embedding(path: str | Path) -> Embedding:
    """Read one embedding file (.pt, .bin or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"embedding '{path}' not found")
    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise CheckpointError(f"{path.name}: not an embedding file; expected one of {', '.join(EMBEDDING_SUFFIXES)}")
    data = read_tensors(path) if suffix == ".safetensors" else _read_pickle(path)
    tensor = _the_tensor(data, path.name)
    step = data.get("step") if isinstance(data, Mapping) else None
    return Embedding(
        name=path.stem,
        vectors=tensor.detach().to(torch.float32, copy=True).contiguous(),  # copied: no tie to the file's memory map
        path=path,
        hash=file_sha256(path)[:SHORT_HASH],
        step=step if isinstance(step, int) and not isinstance(step, bool) else None,
    )


def read_embeddings_dir(folder: str | Path) -> dict[str, Embedding]:
    """All embeddings under `folder` (recursively, as the web UI walks it), keyed by name, sorted.

    Empty files and other suffixes (preview images, `.optim` training state) are skipped, as the
    web UI does; an unreadable embedding file raises, naming it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"embeddings folder '{folder}' not found")
    found: dict[str, Embedding] = {}
    for root, _, files in os.walk(folder, followlinks=True):
        for file in sorted(files):
            path = Path(root) / file
            if path.suffix.lower() not in EMBEDDING_SUFFIXES or path.stat().st_size == 0:
                continue
            emb = read_embedding(path)
            if emb.name in found:  # the web UI would keep whichever it read last
                raise CheckpointError(f"two embeddings are named '{emb.name}': {found[emb.name].path} and {path}; "
                                      "rename one (the file name is the trigger word)")
            found[emb.name] = emb
    return dict(sorted(found.items(), key=lambda item: item[0].lower()))


def check_width(embedding: Embedding, width: int) -> None:
    """Raise unless the vectors fit a text encoder `width` wide (768 for SD 1.x, 1024 for SD 2.x)."""
    if embedding.dim != width:
        raise CheckpointError(
            f"{embedding.path.name}: embedding '{embedding.name}' has {embedding.dim}-wide vectors, but this "
            f"model's text encoder is {width} wide (SD 1.x: 768, SD 2.x: 1024); it was made for another model family"
        )
