"""Soak: many small requests from several clients against a real `stablekit serve`, mixed tasks and
bad requests; every request must be answered, memory must stay flat and file descriptors must not leak.

    python -m stablekit.bench.soak [--requests 1000] [--clients 4] [--model shapes-demo]

Each client sends, in turn: txt2img, img2img, a job-API job (submitted, then polled to its end), a
bad sampler name (400), a malformed body (422) and an unknown job id (404). The server's resident
memory (VmRSS) and open file descriptors are read from /proc after every `--sample-every` requests;
the memory slope is a least-squares line over the samples after the first tenth (warm-up).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

SMALL = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "steps": 4, "seed": 1,
         "sampler_name": "Euler"}


@dataclass
class SoakResult:
    requests: int
    unanswered: int
    statuses: dict[int, int]
    unexpected: list[str]  # "kind: status" where the status was not the one the request must get
    rss_mib: list[tuple[int, float]] = field(default_factory=list)  # (requests done, MiB)
    fds: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def slope_mib_per_1000(self) -> float:
        """Least-squares slope of resident memory after the warm-up tenth, in MiB per 1000 requests."""
        points = [p for p in self.rss_mib if p[0] >= self.requests // 10] or self.rss_mib
        if len(points) < 2:
            return 0.0
        n = len(points)
        mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
        sxx = sum((x - mx) ** 2 for x, _ in points)
        return 1000 * sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def _picture_b64() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _call(url: str, method: str, path: str, body: bytes | None) -> tuple[int, dict | list | None]:
    req = urllib.request.Request(url + path, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


def _proc(pid: int) -> tuple[float, int]:
    """(resident MiB, open file descriptors) of a process."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def soak(model: str, requests: int = 1000, clients: int = 4, sample_every: int = 50,
         workdir: Path | None = None, threads: int = 1) -> SoakResult:
    """Start a server on `model`, run the mixed requests, stop it; the server runs `threads` CPU threads."""
    work = Path(workdir or tempfile.mkdtemp(prefix="soak-"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "stablekit.cli", "serve", "--model", model, "--port", str(port),
                             "--outputs", str(work / "outputs"), "--log-level", "warning", "--queue-size", "64",
                             "--threads", str(threads)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if _call(url, "GET", "/sdapi/v1/options", None)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{(work / 'server.log').read_text()}")
            time.sleep(0.3)
        return _run(url, proc.pid, requests, clients, sample_every)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _run(url: str, pid: int, requests: int, clients: int, sample_every: int) -> SoakResult:
    picture = _picture_b64()
    kinds = [
        ("txt2img", "POST", "/sdapi/v1/txt2img", json.dumps(SMALL).encode(), 200),
        ("img2img", "POST", "/sdapi/v1/img2img",
         json.dumps({**SMALL, "init_images": [picture], "denoising_strength": 0.5}).encode(), 200),
        ("job", "POST", "/api/v1/jobs", json.dumps({"task": "txt2img", **SMALL}).encode(), 202),
        ("bad sampler", "POST", "/sdapi/v1/txt2img", json.dumps({**SMALL, "sampler_name": "nope"}).encode(), 400),
        ("malformed", "POST", "/sdapi/v1/txt2img", b"{not json", 422),
        ("unknown job", "GET", "/api/v1/jobs/0123456789abcdef0123456789abcdef", None, 404),
    ]
    result = SoakResult(requests, 0, {}, [])
    lock = threading.Lock()
    counter = iter(range(requests))
    done = [0]
    result.rss_mib.append((0, _proc(pid)[0]))
    result.fds.append((0, _proc(pid)[1]))

    def client() -> None:
        for i in counter:
            kind, method, path, body, expected = kinds[i % len(kinds)]
            try:
                status, answer = _call(url, method, path, body)
                if kind == "job" and status == 202:
                    job_id = answer["id"]
                    while status == 202 or (answer and answer.get("status") in ("queued", "running")):
                        time.sleep(0.05)
                        status, answer = _call(url, "GET", f"/api/v1/jobs/{job_id}", None)
                    expected = 200 if answer and answer.get("status") == "done" else -1
            except OSError:
                status = None
            with lock:
                if status is None:
                    result.unanswered += 1
                else:
                    result.statuses[status] = result.statuses.get(status, 0) + 1
                    if status != expected:
                        result.unexpected.append(f"{kind}: {status}")
                done[0] += 1
                if done[0] % sample_every == 0:
                    rss, fds = _proc(pid)
                    result.rss_mib.append((done[0], rss))
                    result.fds.append((done[0], fds))

    start = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    result.seconds = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stablekit.bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-demo")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--sample-every", type=int, default=50)
    args = ap.parse_args(argv)
    r = soak(args.model, args.requests, args.clients, args.sample_every)
    first, last = r.rss_mib[0][1], r.rss_mib[-1][1]
    print(f"{r.requests} requests from {args.clients} clients in {r.seconds:.0f} s; unanswered {r.unanswered}; "
          f"statuses {dict(sorted(r.statuses.items()))}; unexpected {len(r.unexpected)}")
    print(f"resident memory {first:.0f} -> {last:.0f} MiB, slope after warm-up {r.slope_mib_per_1000:+.1f} MiB "
          f"per 1000 requests; file descriptors {r.fds[0][1]} -> {r.fds[-1][1]}")
    return 0 if r.unanswered == 0 and not r.unexpected else 1


if __name__ == "__main__":
    sys.exit(main())
