"""Retention: finished jobs go oldest first past --keep-results DAYS or --max-results-gb; unfinished never."""

from __future__ import annotations

import time

import pytest

import stablekit
from stablekit.server.jobs import DONE, FAILED, QUEUED, RUNNING, JobRecord, JobStore
from stablekit.server.retention import Retention, prune

from .test_server_jobs import JOB, make_config, wait_for

DAY = 86400.0


@pytest.fixture(scope="module")
def engine(tiny_models):
    return stablekit.load(tiny_models["sd1"].single_file)


def _store(tmp_path, now):
    store = JobStore(tmp_path / "jobs.sqlite3")
    outputs = tmp_path / "outputs"
    for job_id, status, age_days in (("old", DONE, 10), ("mid", FAILED, 5), ("new", DONE, 1),
                                     ("waiting", QUEUED, 20), ("busy", RUNNING, 20)):
        finished = now - age_days * DAY if status in (DONE, FAILED) else None
        store.add(JobRecord(job_id, "job", "txt2img", {}, status=status, created=now - age_days * DAY - 1,
                            finished=finished))
        (outputs / job_id).mkdir(parents=True)
        (outputs / job_id / "00000-1.png").write_bytes(b"x" * 1000)
    return store, outputs


def test_age_limit_removes_only_old_finished_jobs(tmp_path):
    now = time.time()
    store, outputs = _store(tmp_path, now)
    assert prune(store, outputs, Retention(keep_days=3), now) == ["old", "mid"]
    assert store.get("old") is None and not (outputs / "old").exists()
    assert {r.id for r in store.list()} == {"new", "waiting", "busy"}
    assert prune(store, outputs, Retention(), now) == []  # no limits: nothing goes


def test_size_limit_removes_oldest_first_and_never_unfinished_jobs(tmp_path):
    now = time.time()
    store, outputs = _store(tmp_path, now)
    # 5000 bytes in all; 2500 allowed: the three finished ones go, the two unfinished stay over the limit
    assert prune(store, outputs, Retention(max_bytes=2500), now) == ["old", "mid", "new"]
    assert {r.id for r in store.list()} == {"waiting", "busy"}
    assert (outputs / "waiting" / "00000-1.png").is_file()


def test_the_server_prunes_its_finished_jobs(tiny_models, engine, tmp_path):
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from stablekit.server.app import create_app

    config = replace(make_config(tiny_models, tmp_path / "out"), keep_results_days=1.0)
    app = create_app(config, loader=lambda spec: engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        job_id = client.post("/api/v1/jobs", json={"task": "txt2img", **JOB}).json()["id"]
        assert wait_for(client, job_id)["status"] == "done" and (config.outputs / job_id).is_dir()
        backend = app.state.backend
        assert backend.prune() == []  # a day has not passed
        backend.store.update(job_id, finished=time.time() - 2 * DAY)
        assert backend.prune() == [job_id]
        assert client.get(f"/api/v1/jobs/{job_id}").status_code == 404 and not (config.outputs / job_id).exists()
