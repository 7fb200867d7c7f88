"""Load: 60 concurrent web-UI requests and 20 job submissions against a real server with a small
queue. Each one completes or is refused with 503 + Retry-After; none is lost; completed pictures
equal the same parameters run alone; the server's peak memory stays bounded."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from .server_support import Server

pytest.importorskip("fastapi")

REQUESTS = 60
JOBS = 20
QUEUE = 16
PEAK_RSS_BOUND_MIB = 1024  # a tiny model: torch + FastAPI + the worker use about 400 MiB; queued work adds little
BASE = {"prompt": "a field", "width": 64, "height": 64, "steps": 2, "sampler_name": "Euler"}


def test_concurrent_requests_complete_or_are_refused_none_lost(tiny_models, tmp_path):
    server = Server(tiny_models["sd1"].single_file, tmp_path, "--queue-size", str(QUEUE))
    try:
        server.request("POST", "/sdapi/v1/txt2img", {**BASE, "seed": 0})  # warm up
        rss_before = server.peak_rss_mib()
        start = threading.Barrier(REQUESTS + JOBS)

        def webui(i: int):
            start.wait()
            try:
                return ("webui", i) + server.request("POST", "/sdapi/v1/txt2img", {**BASE, "seed": 1000 + i})
            except OSError as e:
                return ("webui", i, None, {"exception": repr(e)}, {})

        def job(i: int):
            start.wait()
            try:
                return ("job", i) + server.request("POST", "/api/v1/jobs", {**BASE, "seed": 5000 + i})
            except OSError as e:
                return ("job", i, None, {"exception": repr(e)}, {})

        with ThreadPoolExecutor(REQUESTS + JOBS) as pool:
            futures = [pool.submit(webui, i) for i in range(REQUESTS)] + [pool.submit(job, i) for i in range(JOBS)]
            results = [f.result(timeout=600) for f in futures]

        completed = [r for r in results if r[0] == "webui" and r[2] == 200 and len(r[3]["images"]) == 1]
        accepted = [r for r in results if r[0] == "job" and r[2] == 202]
        refused = [r for r in results if r[2] in (429, 503)]
        assert all(int(r[4]["retry-after"]) >= 1 for r in refused)
        lost = [r for r in results if r not in completed and r not in accepted and r not in refused]
        assert lost == [], lost[:3]
        assert completed and refused  # the small queue both served and refused some

        deadline = time.monotonic() + 600
        finished = {}
        while len(finished) < len(accepted) and time.monotonic() < deadline:
            for r in accepted:
                _, body, _ = server.request("GET", f"/api/v1/jobs/{r[3]['id']}")
                if body["status"] in ("done", "failed", "cancelled"):
                    finished[r[3]["id"]] = body
            time.sleep(0.2)
        assert len(finished) == len(accepted) and all(b["status"] == "done" for b in finished.values())

        for r in completed[:3]:  # the same parameters alone give the same PNG, byte for byte
            status, alone, _ = server.request("POST", "/sdapi/v1/txt2img", {**BASE, "seed": 1000 + r[1]})
            assert status == 200 and alone["images"] == r[3]["images"]
        peak = server.peak_rss_mib()
        print(f"\nload test: {REQUESTS} web-UI requests + {JOBS} job submissions at once, queue size {QUEUE}: "
              f"{len(completed)} completed, {len(accepted)} jobs accepted and done, {len(refused)} refused "
              f"(503), {len(lost)} lost; server peak RSS {peak:.0f} MiB (after warm-up {rss_before:.0f} MiB)")
        assert peak < PEAK_RSS_BOUND_MIB
        _, progress, _ = server.request("GET", "/sdapi/v1/progress")
        assert progress["state"]["job_count"] == 0  # nothing left running
    finally:
        server.stop()
