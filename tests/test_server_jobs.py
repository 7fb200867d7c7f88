"""The job API: submit returns at once, status and results, the SSE stream, cancelling, the
bounded FIFO queue, and persistence across a restart of the app (records and pictures)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import stablekit
from stablekit.server.app import create_app
from stablekit.server.config import Limits, ServerConfig
from stablekit.server.jobs import JobRecord, JobStore

from .server_support import from_b64

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

JOB = {"prompt": "a kite", "width": 64, "height": 64, "steps": 3, "seed": 8, "sampler_name": "Euler"}
WAIT_S = 300  # bounds for polling loops on a busy machine, not speed requirements


@pytest.fixture(scope="module")
def engine(tiny_models):
    return stablekit.load(tiny_models["sd1"].single_file)


def make_config(tiny_models, outputs, queue_size=3) -> ServerConfig:
    return ServerConfig(model=str(tiny_models["sd1"].single_file), outputs=outputs,
                        limits=Limits(queue_size=queue_size, max_steps=200))


@pytest.fixture()
def app_client(tiny_models, engine, tmp_path):
    app = create_app(make_config(tiny_models, tmp_path / "out"), loader=lambda spec: engine)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield app, c


def wait_for(client, job_id: str, statuses=("done", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']}")


def test_submit_returns_at_once_then_results(app_client, engine):
    app, client = app_client
    r = client.post("/api/v1/jobs", json={"task": "txt2img", **JOB})
    assert r.status_code == 202 and r.headers["Location"] == f"/api/v1/jobs/{r.json()['id']}"
    job = r.json()
    assert job["status"] in ("queued", "running") and job["links"]["events"].endswith("/events")
    done = wait_for(client, job["id"])
    assert done["status"] == "done" and done["attempts"] == 1 and done["error"] is None
    assert done["info"]["all_seeds"] == [8] and len(done["images"]) == 1
    png = client.get(done["images"][0])
    assert png.headers["content-type"] == "image/png"
    want = engine.txt2img(prompt="a kite", width=64, height=64, steps=3, seed=8, sampler="Euler")[0]
    got = from_b64(__import__("base64").b64encode(png.content).decode())
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert "Seed: 8" in got.info["parameters"]
    assert any(j["id"] == job["id"] for j in client.get("/api/v1/jobs").json())


def test_event_stream_reports_status_progress_previews_and_the_end(app_client):
    app, client = app_client
    job_id = client.post("/api/v1/jobs", json={**JOB, "steps": 40}).json()["id"]
    events = []
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    names = [n for n, _ in events]
    assert names[0] == "status" and names[-1] == "done"
    assert events[-1][1]["status"] == "done" and len(events[-1][1]["images"]) == 1
    progress = [d for n, d in events if n == "progress"]
    steps = [d["step"] for d in progress]
    assert steps == sorted(steps) and all(0 < d["fraction"] <= 1 for d in progress)
    previews = [d for n, d in events if n == "preview"]
    if progress:  # a fast machine may finish between two polls; when it is seen, previews come with it
        assert previews and previews[0]["image"].startswith("data:image/png;base64,")


def test_queue_is_fifo_bounded_and_cancellable(app_client):
    app, client = app_client
    backend = app.state.backend
    with backend.slot.lock:  # hold the worker: the first job waits at the engine, the others queue
        first = client.post("/api/v1/jobs", json=JOB).json()["id"]
        deadline = time.monotonic() + WAIT_S
        while client.get(f"/api/v1/jobs/{first}").json()["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.02)
        queued = [client.post("/api/v1/jobs", json={**JOB, "seed": 100 + i}).json()["id"] for i in range(3)]
        assert [client.get(f"/api/v1/jobs/{q}").json()["position"] for q in queued] == [0, 1, 2]
        full = client.post("/api/v1/jobs", json=JOB)
        assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1
        assert set(full.json()) == {"error", "detail", "body", "errors"}
        full = client.post("/sdapi/v1/txt2img", json=JOB)  # the same queue serves the web UI's API
        assert full.status_code == 503
        cancelled = client.delete(f"/api/v1/jobs/{queued[1]}").json()
        assert cancelled["status"] == "cancelled"
        assert client.get(f"/api/v1/jobs/{queued[2]}").json()["position"] == 1
    jobs = [wait_for(client, j) for j in (first, queued[0], queued[2])]
    assert [j["status"] for j in jobs] == ["done"] * 3
    assert jobs[0]["started"] <= jobs[1]["started"] <= jobs[2]["started"]  # first in, first out
    assert client.delete(f"/api/v1/jobs/{first}").status_code == 409


def wait_until_sampling(client, job_id: str) -> None:
    """Poll until the job has taken its first sampling step (or WAIT_S passes)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["progress"] and job["progress"]["step"] > 0:
            return
        time.sleep(0.02)


def test_cancel_a_running_job(app_client):
    app, client = app_client
    job_id = client.post("/api/v1/jobs", json={**JOB, "steps": 150}).json()["id"]
    wait_until_sampling(client, job_id)
    client.delete(f"/api/v1/jobs/{job_id}")
    job = wait_for(client, job_id)
    assert job["status"] == "cancelled" and job["images"] == []


@pytest.mark.parametrize("job_id", ["0" * 31, "../../etc/passwd", "..%2F..%2Fjobs.sqlite3", "A" * 32])
def test_unknown_or_malformed_job_ids_are_404(app_client, job_id):
    _, client = app_client
    for method in ("GET", "DELETE"):
        r = client.request(method, f"/api/v1/jobs/{job_id}")
        assert r.status_code == 404 and set(r.json()) == {"error", "detail", "body", "errors"}
    assert client.get(f"/api/v1/jobs/{job_id}/images/0").status_code == 404


def test_bad_job_requests_are_4xx(app_client):
    _, client = app_client
    assert client.post("/api/v1/jobs", json={"task": "sharpen"}).status_code == 400
    assert client.post("/api/v1/jobs", json={**JOB, "steps": 0}).status_code == 400
    assert client.post("/api/v1/jobs", json={"task": "img2img", **JOB}).status_code == 404  # no init image
    assert client.post("/api/v1/jobs", content=b"[]", headers={"Content-Type": "application/json"}).status_code == 422


def test_finished_jobs_survive_a_restart_and_unfinished_ones_are_rerun_or_failed(tiny_models, engine, tmp_path):
    config = make_config(tiny_models, tmp_path / "out")
    with TestClient(create_app(config, loader=lambda spec: engine), raise_server_exceptions=False) as client:
        finished = wait_for(client, client.post("/api/v1/jobs", json=JOB).json()["id"])
        first_png = client.get(finished["images"][0]).content
    # what a crash leaves behind: a job-API job and an /sdapi request recorded as running
    store = JobStore(config.db_path)
    store.add(JobRecord("a" * 32, "job", "txt2img", {**JOB, "seed": 77}, status="running", attempts=1))
    store.add(JobRecord("b" * 32, "webui", "txt2img", dict(JOB), status="running", attempts=1, persist=False))
    store.add(JobRecord("c" * 32, "job", "txt2img", dict(JOB), status="running", attempts=2))
    store.close()
    with TestClient(create_app(config, loader=lambda spec: engine), raise_server_exceptions=False) as client:
        again = client.get(f"/api/v1/jobs/{finished['id']}").json()
        assert again["status"] == "done" and client.get(again["images"][0]).content == first_png
        rerun = wait_for(client, "a" * 32)
        assert rerun["status"] == "done" and rerun["attempts"] == 2 and rerun["info"]["all_seeds"] == [77]
        lost = client.get(f"/api/v1/jobs/{'b' * 32}").json()
        assert lost["status"] == "failed" and "connection was lost" in lost["error"]
        crashed_twice = client.get(f"/api/v1/jobs/{'c' * 32}").json()
        assert crashed_twice["status"] == "failed" and "not retried" in crashed_twice["error"]


def test_a_graceful_shutdown_puts_the_running_job_back(tiny_models, engine, tmp_path):
    config = make_config(tiny_models, tmp_path / "out")
    with TestClient(create_app(config, loader=lambda spec: engine), raise_server_exceptions=False) as client:
        job_id = client.post("/api/v1/jobs", json={**JOB, "steps": 150}).json()["id"]
        wait_until_sampling(client, job_id)
    store = JobStore(config.db_path)
    left = store.get(job_id)
    store.close()
    assert left.status == "queued" and left.attempts == 0  # not counted as a crash, no partial result
    with TestClient(create_app(config, loader=lambda spec: engine), raise_server_exceptions=False) as client:
        job = wait_for(client, job_id)
        assert job["status"] == "done" and job["attempts"] == 1
