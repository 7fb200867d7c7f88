"""Reading tensors from files: safetensors (memory-mapped, lazy), weights-only pickles, and
key-remapped views over them. The only code that opens weight files.
"""

from __future__ import annotations

import json
import math
import mmap
import pickle
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..detect import CheckpointError
from ..diffusers_keys import Recipe

PAGE = mmap.PAGESIZE


class _LazyTensors(Mapping[str, torch.Tensor]):
    """Key -> tensor, read on access; `shapes` gives meta tensors for detection without reading.

    `release(key)` tells the reader a tensor has been copied elsewhere, so its pages can go.
    """

    def __init__(
        self,
        keys: list[str],
        shape_of: Callable[[str], tuple[tuple[int, ...], torch.dtype]],
        read: Callable[[str], torch.Tensor],
        release: Callable[[str], None] = lambda key: None,
    ):
        self._keys, self._shape_of, self._read, self.release = keys, shape_of, read, release

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
_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header


def _header_json(path: Path) -> tuple[dict, int]:
    """The safetensors header as stored (tensor entries and `__metadata__`) and its length."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path.name}: not a readable safetensors file (bad header length)")
        try:
            table = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{path.name}: not a readable safetensors file (header is not JSON)") from None
    if not isinstance(table, dict):
        raise CheckpointError(f"{path.name}: not a readable safetensors file (header is not a table)")
    return table, n


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The free-text `__metadata__` of a safetensors file (training settings, hashes), as strings."""
    meta = _header_json(path)[0].get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def shown_keys(keys: Sequence[str], n: int = 6) -> str:
    """The first few of many names, for an error message."""
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensor table (name -> dtype, shape, data_offsets) and where the data starts."""
    size = path.stat().st_size
    table, n = _header_json(path)
    table.pop("__metadata__", None)
    data_size = size - 8 - n
    for key, entry in table.items():
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = (int(o) for o in entry["data_offsets"])
            count = math.prod(int(d) for d in entry["shape"])
        except KeyError as e:
            raise CheckpointError(f"{path.name}: not a readable safetensors file: tensor '{key}' has an "
                                  f"unsupported dtype or a malformed entry ({e})") from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{path.name}: not a readable safetensors file: tensor '{key}' has a malformed entry") from None
        if not 0 <= begin <= end <= data_size or end - begin != count * dtype.itemsize:
            raise CheckpointError(f"{path.name}: not a readable safetensors file: tensor '{key}' lies outside "
                                  "the file or has the wrong size (the file may be truncated)")
    return table, 8 + n


def _read_safetensors(path: Path) -> Mapping[str, torch.Tensor]:
    """Tensors as zero-copy views of a private memory map of the file.

    Why not the safetensors package's reader: after a tensor is converted to another dtype its
    source pages would stay resident until the whole file is closed, so loading a 4 GB fp32 file
    as bf16 peaked at 6.5 GB. Here `release` drops each converted tensor's pages at once.
    """
    table, start = _safetensors_header(path)
    with open(path, "rb") as f:  # copy-on-write: weights are never written, but torch wants a writable buffer
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if path.stat().st_size else None

    def span(key: str) -> tuple[int, int]:
        begin, end = table[key]["data_offsets"]
        return start + int(begin), start + int(end)

    def shape_of(key: str) -> tuple[tuple[int, ...], torch.dtype]:
        entry = table[key]
        return tuple(int(d) for d in entry["shape"]), _SAFETENSORS_DTYPES[entry["dtype"]]

    def read(key: str) -> torch.Tensor:
        shape, dtype = shape_of(key)
        begin, end = span(key)
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        if begin % dtype.itemsize:  # unaligned data (old writers): a copy is the only safe view
            return torch.frombuffer(bytearray(mm[begin:end]), dtype=dtype).reshape(shape)
        return torch.frombuffer(mm, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin).reshape(shape)

    def release(key: str) -> None:
        begin, end = span(key)
        first, last = -(-begin // PAGE) * PAGE, end // PAGE * PAGE  # whole pages inside the tensor only
        if mm is not None and last > first:
            mm.madvise(mmap.MADV_DONTNEED, first, last - first)

    return _LazyTensors(list(table), shape_of, read, release)


def release(sd: Mapping[str, torch.Tensor], key: str) -> None:
    """Let `sd` drop the memory behind `key` (its value has been copied); a no-op for plain dicts."""
    if isinstance(sd, (_LazyTensors, Remapped)):
        sd.release(key)


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

    def release(self, key: str) -> None:
        source, (keys, _) = self._recipes[key]
        for k in keys:
            release(source, k)

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
