"""The checkpoints a client may switch between: the one the server started with plus --models-dir.

Clients name a checkpoint by the title the listing gives ("name.safetensors [hash]"), by its name
or by its file name; only listed checkpoints can be loaded, so no client string becomes a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import file_sha256
from ..checkpoint.sources import SINGLE_FILE_SUFFIXES
from .errors import ApiError


@dataclass(frozen=True)
class Checkpoint:
    title: str  # "name.safetensors [0123456789]", the web UI's sd_model_checkpoint value
    model_name: str  # name without the suffix
    filename: str  # the file or folder (or hub id) it loads from
    hash: str | None  # first 10 hex digits of the sha256 (single files)
    sha256: str | None


def _describe(spec: str, name: str) -> Checkpoint:
    path = Path(spec)
    sha = file_sha256(path) if path.is_file() else None  # cached by path, size and mtime
    short = sha[:10] if sha else None
    stem = name
    for suffix in SINGLE_FILE_SUFFIXES:
        stem = stem.removesuffix(suffix)
    title = f"{name} [{short}]" if short else name
    return Checkpoint(title, stem, str(path.resolve()) if path.exists() else spec, short, sha)


class Checkpoints:
    def __init__(self, default: str, models_dir: Path | None):
        self.default_spec = default
        self.models_dir = models_dir
        self._cache: dict[tuple[str, int, int], Checkpoint] = {}

    def _entry(self, spec: str, name: str) -> Checkpoint:
        path = Path(spec)
        stat = path.stat() if path.exists() else None
        key = (spec, stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0)
        if key not in self._cache:
            self._cache[key] = _describe(spec, name)
        return self._cache[key]

    def default(self) -> Checkpoint:
        return self._entry(self.default_spec, Path(self.default_spec).name or self.default_spec)

    def list(self) -> list[Checkpoint]:
        """The start-up checkpoint first, then --models-dir (scanned again on each call, sorted)."""
        found = [self.default()]
        if self.models_dir and self.models_dir.is_dir():
            files = sorted(p for p in self.models_dir.rglob("*") if p.is_file() and p.suffix in SINGLE_FILE_SUFFIXES)
            folders = sorted(p.parent for p in self.models_dir.rglob("model_index.json"))
            for p in [*files, *folders]:
                if any(part.startswith(".") for part in p.relative_to(self.models_dir).parts):
                    continue
                entry = self._entry(str(p), p.relative_to(self.models_dir).as_posix())
                if entry.filename != found[0].filename:
                    found.append(entry)
        return found

    def find(self, name: str) -> Checkpoint:
        """A listed checkpoint by title, name (with or without suffix) or hash; else 400 naming the choices."""
        wanted = name.strip()
        plain = wanted.split(" [")[0]
        listed = self.list()
        for c in listed:
            if wanted in (c.title, c.hash) or plain in (c.title.split(" [")[0], c.model_name):
                return c
        titles = ", ".join(c.title for c in listed)
        raise ApiError(400, f"unknown checkpoint {name!r}; choose from {titles}")
