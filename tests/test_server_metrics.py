"""GET /metrics (Prometheus text), one JSON log line per job, and the API docs behind the API's auth."""

from __future__ import annotations

import json
import logging
import re

import pytest

import stablekit

from .test_server_security import SMALL, TOKEN, basic, client_for

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def engine(tiny_models):
    return stablekit.load(tiny_models["sd1"].single_file)

SAMPLE = re.compile(r"^(stablekit_[a-z_]+)(\{[a-z]+=\"[a-z]+\"\})? (-?[0-9.e+-]+)$")


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) stablekit_[a-z_]+ ", line), line
            continue
        m = SAMPLE.match(line)
        assert m, line  # every sample line is in the exposition format
        out[m[1] + (m[2] or "")] = float(m[3])
    return out


def test_metrics_count_jobs_pictures_and_steps_and_each_job_logs_one_json_line(tiny_models, engine, tmp_path,
                                                                                caplog):
    with client_for(tiny_models, engine, tmp_path) as client, caplog.at_level(logging.INFO, "stablekit.server.jobs"):
        before = _samples(client.get("/metrics").text)
        assert client.post("/sdapi/v1/txt2img", json={**SMALL, "steps": 4, "batch_size": 2}).status_code == 200
        assert client.post("/sdapi/v1/txt2img", json={**SMALL, "sampler_name": "nope"}).status_code == 400
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = _samples(r.text)
    assert before.get('stablekit_jobs_finished_total{outcome="done"}', 0) == 0
    assert after['stablekit_jobs_finished_total{outcome="done"}'] == 1 and after["stablekit_images_total"] == 2
    assert after["stablekit_sampler_steps_total"] == 3  # the first step of the job is not timed
    assert after["stablekit_sampler_step_seconds_total"] > 0 and after["stablekit_images_per_second"] > 0
    assert after["stablekit_queue_length"] == 0 and after["stablekit_job_running"] == 0
    assert after['stablekit_jobs{state="done"}'] >= 1 and after["stablekit_resident_memory_bytes"] > 50e6
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "stablekit.server.jobs"]
    assert len(lines) == 1
    (line,) = lines
    assert {k: line[k] for k in ("event", "task", "size", "steps", "images", "outcome")} == {
        "event": "job", "task": "txt2img", "size": "64x64", "steps": 4, "images": 2, "outcome": "done"}
    assert line["seconds"] > 0


def test_docs_and_metrics_are_behind_the_apis_auth_unless_public_docs(tiny_models, engine, tmp_path):
    with client_for(tiny_models, engine, tmp_path / "a", basic_auth=(("user1", "pw1"),), token=TOKEN) as client:
        for path in ("/docs", "/openapi.json", "/metrics"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers=basic("user1", "pw1")).status_code == 200, path
        paths = client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()["paths"]
        assert "/sdapi/v1/txt2img" in paths and "/docs" not in paths
    with client_for(tiny_models, engine, tmp_path / "b", token=TOKEN, public_docs=True) as client:
        assert client.get("/docs").status_code == 200 and client.get("/openapi.json").status_code == 200
        assert client.get("/metrics").status_code == 401
