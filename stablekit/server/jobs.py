"""Job records, their SQLite store, and the queue interface.

A job is accepted only after its record is written, so a crash never loses an accepted job: on
start-up `recover()` re-queues the unfinished jobs of the job API and marks unfinished `/sdapi`
jobs failed (their client's connection is gone; nobody would read the result).

`JobQueue` is the seam for other backends: a multi-machine deployment can put ids into Redis and
run workers elsewhere, keeping the same store interface (or a shared database).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
MAX_ATTEMPTS = 2  # a job that was running when the server died twice is failed, not retried forever


def new_job_id() -> str:
    return uuid.uuid4().hex  # made here, never by the client: safe as a folder name


def valid_job_id(job_id: str) -> bool:
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)


@dataclass
class JobRecord:
    id: str
    kind: str  # "webui" (an /sdapi request waiting on its connection) or "job" (the job API)
    task: str  # txt2img or img2img, as submitted
    request: dict[str, Any]  # the request fields, with the concrete seed
    status: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    error: str | None = None
    info: dict[str, Any] | None = None
    images: list[str] = field(default_factory=list)  # file names in the job's output folder
    persist: bool = True  # save the pictures (always for the job API; save_images for /sdapi)


_COLUMNS = ("id", "kind", "task", "request", "status", "created", "started", "finished", "attempts", "error",
            "info", "images", "persist")
_JSON = ("request", "info", "images")


class JobStore:
    """SQLite table of job records; one connection shared by threads under a lock."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")  # readers do not block the worker's writes
            self._db.execute("""CREATE TABLE IF NOT EXISTS jobs (
                id TEXT PRIMARY KEY, kind TEXT, task TEXT, request TEXT, status TEXT, created REAL,
                started REAL, finished REAL, attempts INTEGER, error TEXT, info TEXT, images TEXT,
                persist INTEGER)""")
            self._db.execute("CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created)")

    def _row(self, row: tuple) -> JobRecord:
        values = dict(zip(_COLUMNS, row))
        for k in _JSON:
            values[k] = json.loads(values[k]) if values[k] is not None else None
        values["persist"] = bool(values["persist"])
        values["images"] = values["images"] or []
        return JobRecord(**values)

    def add(self, rec: JobRecord) -> None:
        values = [getattr(rec, c) for c in _COLUMNS]
        values = [json.dumps(v) if c in _JSON and v is not None else v for c, v in zip(_COLUMNS, values)]
        with self._lock:
            self._db.execute(f"INSERT INTO jobs VALUES ({', '.join('?' * len(_COLUMNS))})", values)

    def update(self, job_id: str, **fields: Any) -> None:
        names = [k for k in fields if k in _COLUMNS and k != "id"]
        values = [json.dumps(fields[k]) if k in _JSON and fields[k] is not None else fields[k] for k in names]
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in names)} WHERE id = ?", [*values, job_id])

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._row(row) if row else None

    def list(self, limit: int = 50, kind: str | None = None) -> list[JobRecord]:
        query = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
        args: list[Any] = []
        if kind:
            query += " WHERE kind = ?"
            args.append(kind)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created DESC LIMIT ?", [*args, limit]).fetchall()
        return [self._row(r) for r in rows]

    def finished_oldest_first(self) -> list[tuple[str, float]]:
        """(id, finished time) of every finished job, oldest first."""
        with self._lock:
            return self._db.execute(f"SELECT id, COALESCE(finished, created) FROM jobs WHERE status IN "
                                    f"({', '.join('?' * len(FINISHED))}) ORDER BY COALESCE(finished, created)",
                                    FINISHED).fetchall()

    def unfinished_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                f"SELECT id FROM jobs WHERE status NOT IN ({', '.join('?' * len(FINISHED))})", FINISHED)]

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def counts(self) -> dict[str, int]:
        """Job records by status."""
        with self._lock:
            return dict(self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())

    def recover(self) -> list[JobRecord]:
        """After a restart: job-API jobs left queued or running go back to the queue (oldest first), unless
        they already crashed the server MAX_ATTEMPTS times; /sdapi jobs are failed. Returns those re-queued."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE status IN (?, ?) "
                                    "ORDER BY created", (QUEUED, RUNNING)).fetchall()
        requeue = []
        for rec in map(self._row, rows):
            if rec.kind == "webui":
                self.update(rec.id, status=FAILED, finished=time.time(),
                            error="the server stopped before this request finished; its connection was lost")
            elif rec.attempts >= MAX_ATTEMPTS:
                self.update(rec.id, status=FAILED, finished=time.time(),
                            error=f"the server stopped while running this job {rec.attempts} times; not retried")
            else:
                self.update(rec.id, status=QUEUED)
                requeue.append(rec)
        return requeue

    def close(self) -> None:
        with self._lock:
            self._db.close()


class QueueFull(Exception):
    pass


class JobQueue(Protocol):
    """FIFO of job ids. A Redis list (LPUSH / BRPOP) fits the same four operations."""

    def put(self, job_id: str, *, force: bool = False) -> int: ...  # position (0 = next); QueueFull when full
    def get(self, timeout: float) -> str | None: ...
    def remove(self, job_id: str) -> bool: ...
    def position(self, job_id: str) -> int | None: ...
    def __len__(self) -> int: ...


class LocalQueue:
    """The in-process JobQueue: bounded deque + condition variable."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._items: deque[str] = deque()
        self._cond = threading.Condition()

    def put(self, job_id: str, *, force: bool = False) -> int:
        with self._cond:
            if not force and len(self._items) >= self.maxsize:
                raise QueueFull()
            self._items.append(job_id)
            self._cond.notify()
            return len(self._items) - 1

    def get(self, timeout: float) -> str | None:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def remove(self, job_id: str) -> bool:
        with self._cond:
            try:
                self._items.remove(job_id)
                return True
            except ValueError:
                return False

    def position(self, job_id: str) -> int | None:
        with self._cond:
            try:
                return self._items.index(job_id)
            except ValueError:
                return None

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
