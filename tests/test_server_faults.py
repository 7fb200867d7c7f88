"""Faults: SIGKILL the real server during a job and start it again on the same folders.

Finished jobs and their pictures are still served; the job that was running is re-run (job API)
and an /sdapi request that was waiting is reported failed; nothing accepted is lost.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import urllib.request

import pytest

from .server_support import Server

pytest.importorskip("fastapi")

JOB = {"prompt": "a lamp", "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler"}
WAIT_S = 600  # a bound for a busy machine, not a speed requirement


def wait_status(server: Server, job_id: str, statuses: tuple[str, ...]) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        status, job, _ = server.request("GET", f"/api/v1/jobs/{job_id}")
        assert status == 200
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']}")


def download(server: Server, path: str) -> bytes:
    with urllib.request.urlopen(server.url + path, timeout=60) as r:
        return r.read()


def test_kill_during_a_job_and_restart(tiny_models, tmp_path):
    model = tiny_models["sd1"].single_file
    server = Server(model, tmp_path)
    try:
        _, finished, _ = server.request("POST", "/api/v1/jobs", {**JOB, "steps": 3})
        finished = wait_status(server, finished["id"], ("done",))
        png = download(server, finished["images"][0])
        _, long_job, _ = server.request("POST", "/api/v1/jobs", {**JOB, "steps": 60, "seed": 5})
        _, queued_job, _ = server.request("POST", "/api/v1/jobs", {**JOB, "steps": 3, "seed": 6})
        webui = threading.Thread(target=lambda: _swallow(server.request, "POST", "/sdapi/v1/txt2img",
                                                         {**JOB, "steps": 3}, timeout=WAIT_S))
        webui.start()  # a web-UI request waiting behind them on its connection
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:  # kill once the long job is under way
            _, job, _ = server.request("GET", f"/api/v1/jobs/{long_job['id']}")
            if job["progress"] and job["progress"]["step"] > 0:
                break
            time.sleep(0.05)
        assert job["status"] == "running"
        while time.monotonic() < deadline and not _webui_rows(tmp_path):  # the web-UI request is recorded
            time.sleep(0.05)
    finally:
        server.kill()
    webui.join(timeout=60)

    restarted = Server(model, tmp_path)
    try:
        _, again, _ = restarted.request("GET", f"/api/v1/jobs/{finished['id']}")
        assert again["status"] == "done" and download(restarted, again["images"][0]) == png
        rerun = wait_status(restarted, long_job["id"], ("done", "failed"))
        assert rerun["status"] == "done" and rerun["attempts"] == 2 and rerun["info"]["all_seeds"] == [5]
        after = wait_status(restarted, queued_job["id"], ("done", "failed"))
        assert after["status"] == "done" and after["attempts"] == 1
        assert rerun["finished"] <= after["started"]  # still first in, first out
        rows = _webui_rows(tmp_path)
        assert rows and all(status in ("done", "failed") for status, _ in rows)
        assert all("connection was lost" in error for status, error in rows if status == "failed")
        print(f"\nfault test: killed with 1 running, 1 queued job-API job and {len(rows)} waiting /sdapi request; "
              f"after restart: finished job served, running job re-run (attempts={rerun['attempts']}), "
              f"queued job done, /sdapi request {rows[0][0]}")
    finally:
        restarted.stop()


def _webui_rows(tmp_path) -> list[tuple[str, str | None]]:
    db = sqlite3.connect(str(tmp_path / "outputs" / "jobs.sqlite3"))
    try:
        return db.execute("SELECT status, error FROM jobs WHERE kind = 'webui'").fetchall()
    finally:
        db.close()


def _swallow(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except OSError:  # the server is killed under it: the connection breaks, as expected
        pass
