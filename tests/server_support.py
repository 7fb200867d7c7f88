"""Helpers for the server tests: a real `stablekit serve` in a subprocess, pictures as base64."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

STARTUP_S = 180  # the machine may be busy; a bound, not a speed requirement


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def from_b64(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def picture(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """A smooth colourful picture (gradients), the same for the same arguments."""
    import numpy as np

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin((x + y + seed) / 7)], -1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def centre_mask(width: int = 64, height: int = 64) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return mask


class Server:
    """`python -m stablekit.cli serve ...` on 127.0.0.1 and a free port; killed by `kill()` or `stop()`."""

    def __init__(self, model: Path, tmp: Path, *extra: str, port: int | None = None,
                 auth: tuple[str, str] | None = None, token: str | None = None, env: dict[str, str] | None = None,
                 new_session: bool = False):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.auth = auth
        self.token = token
        self.log = tmp / f"server-{self.port}-{time.monotonic_ns()}.log"
        args = [sys.executable, "-m", "stablekit.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
                "--port", str(self.port), "--outputs", str(tmp / "outputs"), "--log-level", "warning", *extra]
        if auth:
            args += ["--api-auth", f"{auth[0]}:{auth[1]}"]
        if token:
            args += ["--token", token]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(args, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=new_session)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def headers(self) -> dict[str, str]:
        if self.token:
            return {"Authorization": f"Bearer {self.token}"}
        if not self.auth:
            return {}
        token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 300) -> tuple[int, dict, dict]:
        """(status, JSON body, headers with lower-case names); HTTP errors are returned, not raised."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **self.headers()})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null"), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null"), {k.lower(): v for k, v in e.headers.items()}

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                status, _, _ = self.request("GET", "/sdapi/v1/options", timeout=5)
                if status == 200:
                    return
            except (OSError, ValueError):  # not listening yet, or a proxy's plain-text answer before the app is up
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server did not start within {STARTUP_S}s:\n{self.log.read_text()}")

    def peak_rss_mib(self) -> float:
        """The server process's peak resident memory (VmHWM), in MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc status")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or power loss."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._log_file.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log_file.close()
