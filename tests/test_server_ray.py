"""`stablekit serve --ray`: the real command on a local Ray instance (started and stopped here), two
engine replicas of the tiny model, against the single-process server on the same model and threads.

Same pictures through webuiapi and the job API; 20 concurrent requests all answered; a replica
SIGKILLed mid-job: the job finishes on the other with the same picture, and a job that takes down
two replicas is failed; progress, previews and interrupt reach the replica; the ingress killed:
finished results still served, the running job re-run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from .server_support import Server, from_b64

pytest.importorskip("ray.serve")
webuiapi = pytest.importorskip("webuiapi")

JOB = {"prompt": "a lamp", "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler", "steps": 6}
LONG = {**JOB, "steps": 150, "n_iter": 4, "seed": 21}  # seconds on the tiny model: time to act during it
WAIT_S = 300  # bounds for a busy machine, not speed requirements


class RayServer(Server):
    """The server in its own process group, which its Ray instance's processes join: stop() ends them all."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, new_session=True, **kwargs)

    def processes(self, title: str) -> list[int]:
        """Pids of this server's Ray processes (its descendants) whose title contains `title`."""
        parents, titles = {}, {}
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit():
                    stat = (entry / "stat").read_text()
                    parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
                    titles[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue

        def descends(pid: int) -> bool:
            while pid > 1:
                pid = parents.get(pid, 0)
                if pid == self.proc.pid:
                    return True
            return False

        return [pid for pid, text in titles.items() if title in text and descends(pid)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # the command shuts Serve and Ray down
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of Ray is left
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self._log_file.close()


@pytest.fixture(scope="module")
def servers(tiny_models, tmp_path_factory):
    model = tiny_models["sd1"].single_file
    plain = Server(model, tmp_path_factory.mktemp("plain"), "--threads", "1")
    try:
        ray = RayServer(model, tmp_path_factory.mktemp("ray"), "--ray", "--replicas", "2", "--replica-cpus", "1",
                        "--queue-size", "32", env={"RAY_USAGE_STATS_ENABLED": "0"})
    except BaseException:
        plain.stop()
        raise
    yield plain, ray
    ray.stop()
    plain.stop()


def wait_job(server: Server, job_id: str, until) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        status, job, _ = server.request("GET", f"/api/v1/jobs/{job_id}")
        assert status == 200, job
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}: {job}")


def finished(job: dict) -> bool:
    return job["status"] in ("done", "failed", "cancelled")


def running_on(job: dict) -> str | None:
    live = job["progress"]
    return live.get("worker") if live and live["step"] > 0 else None


def download(server: Server, path: str) -> bytes:
    with urllib.request.urlopen(server.url + path, timeout=60) as r:
        return r.read()


def job_pictures(server: Server, body: dict) -> tuple[dict, list[bytes]]:
    status, job, _ = server.request("POST", "/api/v1/jobs", body)
    assert status == 202, job
    job = wait_job(server, job["id"], finished)
    return job, [download(server, link) for link in job["images"]]


def kill_worker(worker: str) -> None:
    host, pid = worker.rsplit(":", 1)
    assert host == socket.gethostname()  # a local instance: the replicas run on this machine
    os.kill(int(pid), signal.SIGKILL)


def test_the_same_pictures_as_the_single_server(servers):
    plain, ray = servers
    results = []
    for server in servers:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        results.append(api.txt2img(prompt="a red barn", seed=11, steps=4, width=64, height=64, batch_size=2))
    for got, want in zip(results[1].images, results[0].images):
        assert np.array_equal(np.asarray(got), np.asarray(want))
        assert got.info["parameters"] == want.info["parameters"]
    assert results[1].info["all_seeds"] == results[0].info["all_seeds"] == [11, 12]
    (job, pngs), (plain_job, plain_pngs) = job_pictures(ray, {**JOB, "n_iter": 2}), job_pictures(plain, {**JOB, "n_iter": 2})
    assert job["status"] == plain_job["status"] == "done" and len(pngs) == 2
    assert pngs == plain_pngs  # byte for byte, infotext included


def test_twenty_concurrent_requests_are_all_answered(servers):
    plain, ray = servers

    def generate(seed: int) -> tuple[int, dict]:
        status, body, _ = ray.request("POST", "/sdapi/v1/txt2img", {**JOB, "seed": seed}, timeout=WAIT_S)
        return status, body

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(generate, range(100, 120)))
    assert [status for status, _ in answers] == [200] * 20
    for seed in (100, 119):  # spot checks against the single server
        _, want, _ = plain.request("POST", "/sdapi/v1/txt2img", {**JOB, "seed": seed}, timeout=WAIT_S)
        assert answers[seed - 100][1]["images"] == want["images"]
    with urllib.request.urlopen(ray.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    assert 'stablekit_jobs_finished_total{outcome="done"}' in text


def test_progress_previews_and_interrupt_reach_the_replica(servers):
    _, ray = servers
    answer: dict = {}
    thread = threading.Thread(target=lambda: answer.update(
        zip(("status", "body"), ray.request("POST", "/sdapi/v1/txt2img", LONG, timeout=WAIT_S)[:2])))
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        _, progress, _ = ray.request("GET", "/sdapi/v1/progress")
        if progress["progress"] > 0.02 and progress["current_image"]:
            break
        time.sleep(0.05)
    assert progress["state"]["sampling_steps"] == 150 and from_b64(progress["current_image"]).size == (64, 64)
    assert ray.request("POST", "/sdapi/v1/interrupt")[0] == 200
    thread.join(WAIT_S)
    assert answer["status"] == 200
    assert 1 <= len(answer["body"]["images"]) < 4  # stopped in the iteration it was in: no further ones


def test_a_replica_killed_mid_job_and_a_job_that_kills_two(servers):
    plain, ray = servers
    _, want = job_pictures(plain, LONG)
    _, job, _ = ray.request("POST", "/api/v1/jobs", LONG)
    first = running_on(wait_job(ray, job["id"], running_on))
    kill_worker(first)
    done = wait_job(ray, job["id"], finished)
    assert done["status"] == "done" and done["attempts"] == 2
    assert [download(ray, link) for link in done["images"]] == want  # the same seed: the same pictures

    _, job, _ = ray.request("POST", "/api/v1/jobs", {**LONG, "seed": 22})
    first = running_on(wait_job(ray, job["id"], running_on))
    kill_worker(first)
    second = running_on(wait_job(ray, job["id"], lambda j: running_on(j) not in (None, first)))
    kill_worker(second)
    failed = wait_job(ray, job["id"], finished)
    assert failed["status"] == "failed" and "stopped 2 times" in failed["error"]
    _, pngs = job_pictures(ray, JOB)  # Serve has started new replicas: the server goes on
    assert len(pngs) == 1


def test_the_ingress_killed(servers):
    _, ray = servers
    done, pngs = job_pictures(ray, JOB)
    _, job, _ = ray.request("POST", "/api/v1/jobs", {**LONG, "n_iter": 2})
    wait_job(ray, job["id"], running_on)
    (ingress,) = ray.processes("ServeReplica:stablekit:ingress")
    os.kill(ingress, signal.SIGKILL)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:  # Serve starts a new ingress on the same job store
        try:
            if ray.request("GET", f"/api/v1/jobs/{done['id']}", timeout=5)[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)
    assert [download(ray, link) for link in done["images"]] == pngs
    rerun = wait_job(ray, job["id"], finished)
    assert rerun["status"] == "done" and rerun["attempts"] == 2 and len(rerun["images"]) == 2


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "2"], "are for --ray"),
    (["--ray", "--autoscale", "3:1"], "need 0 <= MIN <= MAX"),
    (["--ray", "--replicas", "0"], "--replicas must be at least 1"),
])
def test_bad_ray_flags_are_one_line_errors_before_ray_starts(tiny_models, flags, message):
    run = subprocess.run([sys.executable, "-m", "stablekit.cli", "serve", "--model", str(tiny_models["sd1"].single_file),
                          *flags], capture_output=True, text=True, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("stablekit: error: ") and message in lines[0]
