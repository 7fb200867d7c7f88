"""Retention: finished jobs' records and pictures removed oldest first, past an age or a total size.

Only finished jobs (done, failed, cancelled) are ever removed: a queued or running job, and so any
job still owed to its client, is kept whatever the limits say.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .jobs import JobStore


@dataclass(frozen=True)
class Retention:
    keep_days: float | None = None  # --keep-results DAYS
    max_bytes: int | None = None  # --max-results-gb N

    @property
    def active(self) -> bool:
        return self.keep_days is not None or self.max_bytes is not None


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def prune(store: JobStore, outputs: Path, retention: Retention, now: float | None = None) -> list[str]:
    """Remove finished jobs older than keep_days, then the oldest finished ones while the pictures of
    all jobs take more than max_bytes. Returns the removed job ids, oldest first."""
    if not retention.active:
        return []
    now = time.time() if now is None else now
    finished = store.finished_oldest_first()  # [(id, finished time)]
    sizes = {job_id: folder_bytes(outputs / job_id) for job_id, _ in finished}
    total = sum(sizes.values()) + sum(folder_bytes(outputs / j) for j in store.unfinished_ids())
    removed = []
    for job_id, finished_at in finished:
        too_old = retention.keep_days is not None and finished_at < now - retention.keep_days * 86400
        too_big = retention.max_bytes is not None and total > retention.max_bytes
        if not (too_old or too_big):
            break  # the rest are newer, and the total fits
        shutil.rmtree(outputs / job_id, ignore_errors=True)
        store.delete(job_id)
        total -= sizes[job_id]
        removed.append(job_id)
    return removed

