"""Reading tensors from files: safetensors (memory-mapped, lazy), weights-only pickles, and
key-remapped views over them. The only code that opens weight files.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..detect import CheckpointError
from ..diffusers_keys import Recipe


class _LazyTensors(Mapping[str, torch.Tensor]):
    """Key -> tensor, read on access; `shapes` gives meta tensors for detection without reading."""

    def __init__(self, keys: list[str], shape_of: Callable[[str], tuple[tuple[int, ...], torch.dtype]], read: Callable[[str], torch.Tensor]):
        self._keys, self._shape_of, self._read = keys, shape_of, read

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._read(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shapes(self) -> dict[str, torch.Tensor]:
        return {k: torch.empty(shape, dtype=dtype, device="meta") for k in self._keys for shape, dtype in [self._shape_of(k)]}


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _read_safetensors(path: Path) -> Mapping[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        f = safe_open(str(path), framework="pt", device="cpu")  # memory-mapped
        keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path.name}: not a readable safetensors file ({e})") from None

    def read(key: str) -> torch.Tensor:
        try:
            return f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{path.name}: tensor '{key}' cannot be read, the file may be truncated ({e})") from None

    def shape_of(key: str) -> tuple[tuple[int, ...], torch.dtype]:
        s = f.get_slice(key)
        if s.get_dtype() not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path.name}: tensor '{key}' has unsupported dtype {s.get_dtype()}")
        return tuple(s.get_shape()), _SAFETENSORS_DTYPES[s.get_dtype()]

    return _LazyTensors(keys, shape_of, read)


def reason(e: BaseException) -> str:
    """The first line of an exception's message, without terminal colour codes; its type if it has none."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _read_pickle(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global it does not know, before calling it.
        wanted = re.search(r"GLOBAL ([\w.]+)", str(e))
        if wanted or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path.name}: refused to load. The pickle asks for "
                f"{wanted.group(1) if wanted else 'a Python object'}, which would run code when loaded; "
                "nothing in it was executed. Convert it to .safetensors with a tool you trust, "
                "or get a .safetensors copy of the model."
            ) from None
        raise CheckpointError(f"{path.name}: not a readable PyTorch checkpoint (damaged or not a checkpoint: {reason(e)})") from None
    except Exception as e:  # torch.load raises many types for damaged files (EOFError, KeyError, zip errors...)
        raise CheckpointError(f"{path.name}: not a readable PyTorch checkpoint ({reason(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path.name}: does not hold a state dict of tensors")
    return obj


def read_tensors(path: Path) -> Mapping[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_pickle(path)


class Remapped(Mapping[str, torch.Tensor]):
    """New key -> tensor made on access from source tensors by a recipe (see diffusers_keys)."""

    def __init__(self, parts: list[tuple[Mapping[str, torch.Tensor], dict[str, Recipe]]]):
        self._recipes = {k: (source, recipe) for source, recipes in parts for k, recipe in recipes.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        source, (keys, combine) = self._recipes[key]
        return combine(*(source[k] for k in keys))

    def __iter__(self):
        return iter(self._recipes)

    def __len__(self) -> int:
        return len(self._recipes)

    def shapes(self) -> dict[str, torch.Tensor]:
        sources = {id(s): s for s, _ in self._recipes.values()}
        shapes = {i: shapes_of(s) for i, s in sources.items()}  # once per source, not per key
        return {k: combine(*(shapes[id(s)][x] for x in keys)) for k, (s, (keys, combine)) in self._recipes.items()}


def shapes_of(sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Meta tensors (shape and dtype only) for lazily read mappings; the mapping itself otherwise."""
    return sd.shapes() if isinstance(sd, (_LazyTensors, Remapped)) else sd
