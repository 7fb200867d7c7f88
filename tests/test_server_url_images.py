"""URL init images: the connection goes to the address that was checked (no second DNS lookup), with
the URL's host in the Host header; redirects, size and time limits hold."""

from __future__ import annotations

import http.server
import io
import threading
import time

import pytest

from stablekit.server import security
from stablekit.server.errors import ApiError

from .server_support import picture


class _Images(http.server.BaseHTTPRequestHandler):
    hosts: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).hosts.append(self.headers["Host"])
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1/secret")
            self.end_headers()
            return
        buf = io.BytesIO()
        picture().save(buf, format="PNG")
        body = buf.getvalue() * (50 if self.path == "/big" else 1)
        self.send_response(200)
        self.end_headers()
        if self.path == "/slow":
            for _ in range(30):
                self.wfile.write(body[:10])
                self.wfile.flush()
                time.sleep(0.1)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def images(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Images.hosts = []
    checked = []

    def approve(host):  # as if "pictures.invalid" had resolved to a public address: the local server's
        checked.append(host)
        return ["127.0.0.1"]

    monkeypatch.setattr(security, "public_address", approve)
    yield server.server_address[1], checked
    server.shutdown()
    server.server_close()


def test_the_fetch_connects_to_the_checked_address_not_a_new_lookup(images):
    port, checked = images
    # ".invalid" never resolves (RFC 2606): a second lookup when connecting would fail
    data = security.fetch_url(f"http://pictures.invalid:{port}/x.png", max_bytes=1 << 20)
    assert data.startswith(b"\x89PNG") and checked == ["pictures.invalid"]
    assert _Images.hosts == [f"pictures.invalid:{port}"]


def test_redirects_size_and_time_limits(images):
    port, _ = images
    with pytest.raises(ApiError, match="^image URLs that redirect are not followed$"):
        security.fetch_url(f"http://pictures.invalid:{port}/moved", max_bytes=1 << 20)
    with pytest.raises(ApiError, match="over 1000 bytes"):
        security.fetch_url(f"http://pictures.invalid:{port}/big", max_bytes=1000)
    with pytest.raises(ApiError, match="^the image URL took more than 1 s$"):
        security.fetch_url(f"http://pictures.invalid:{port}/slow", max_bytes=1 << 20, timeout=1.0)
    with pytest.raises(ApiError, match="http:// or https://"):
        security.fetch_url("ftp://pictures.invalid/x.png", max_bytes=10)
