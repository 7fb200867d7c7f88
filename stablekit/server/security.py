"""Who may come in and how much they may send: auth, the bind-address rule, the body-size limit,
and the policy for init images given as URLs."""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import socket
from typing import Callable
from urllib.parse import urlsplit

from fastapi import Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import ServerConfig
from .errors import ApiError

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, config: ServerConfig, insecure: bool) -> None:
    """Listening beyond this machine without credentials is refused unless asked for explicitly."""
    if not is_loopback(host) and not config.auth_enabled and not insecure:
        raise ValueError(f"refusing to listen on {host} without authentication: give --api-auth user:pass "
                         "or --token, or --insecure if the network is trusted")


def parse_basic_auth(spec: str | None) -> tuple[tuple[str, str], ...]:
    """"user:pass,user2:pass2" (the web UI's --api-auth) -> pairs."""
    if not spec:
        return ()
    pairs = []
    for item in spec.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth expects user:password[,user2:password2], got an entry {item.strip()!r}")
        pairs.append((user, password))
    return tuple(pairs)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())  # constant time: no guessing by response timing


def authorized(config: ServerConfig, header: str | None) -> bool:
    if not config.auth_enabled:
        return True
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() == "bearer" and config.token:
        return _same(value.strip(), config.token)
    if scheme.lower() == "basic" and config.basic_auth:
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        ok = False
        for u, p in config.basic_auth:  # check every pair so timing does not tell which user exists
            ok |= _same(user, u) & _same(password, p)
        return ok
    return False


def auth_dependency(config: ServerConfig) -> Callable[[Request], None]:
    def require(request: Request) -> None:
        if not authorized(config, request.headers.get("authorization")):
            schemes = (['Basic realm="stablekit"'] if config.basic_auth else []) + (["Bearer"] if config.token else [])
            raise ApiError(401, "missing or wrong credentials", headers={"WWW-Authenticate": ", ".join(schemes)})
    return require


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413, counted as it arrives (a missing
    or false Content-Length does not get around it), before anything is decoded."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise PayloadTooLarge(self.limit)
            return message

        try:
            await self.app(scope, counted, send)
        except PayloadTooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        import json

        body = json.dumps({"error": "PayloadTooLarge", "detail": f"request body over {self.limit} bytes",
                           "body": "", "errors": f"request body over {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class PayloadTooLarge(StarletteHTTPException):
    """Raised while the body is read; an HTTP exception so the framework passes it on as a 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes")


def public_address(host: str) -> list[str]:
    """Resolve `host`; refuse it if any address is loopback, private, link-local, reserved or multicast
    (so a URL cannot make the server reach into its own network)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as e:
        raise ApiError(400, f"cannot resolve the image URL's host {host!r} ({e})") from None
    addresses = sorted({info[4][0] for info in infos})
    for a in addresses:
        ip = ipaddress.ip_address(a.split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise ApiError(400, f"image URLs may not point at local or private addresses ({host} is {a})")
    return addresses


def fetch_url(url: str, max_bytes: int, timeout: float = 10.0) -> bytes:
    """GET an http(s) URL whose host resolves only to public addresses; no redirects; at most
    `max_bytes` and `timeout` seconds in all.

    The connection goes to the address that was checked (with the URL's host in the Host header and,
    for https, in SNI and certificate checks), so a DNS answer that changes between the check and the
    connection (rebinding) cannot point it elsewhere.
    """
    import http.client
    import ssl
    import time

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, "an image URL must be http:// or https:// with a host")
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ApiError(400, "the image URL's port is not a number") from None
    address = public_address(host)[0]
    deadline = time.monotonic() + timeout

    class Pinned(http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection):
        def connect(self) -> None:  # to the checked address, never a new lookup of the name
            self.sock = socket.create_connection((address, port), timeout=timeout)
            if parts.scheme == "https":
                self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=host)

    connection = Pinned(host, port, timeout=timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("GET", path, headers={"Host": parts.netloc.rpartition("@")[2],
                                                 "User-Agent": "stablekit"})
        response = connection.getresponse()
        if 300 <= response.status < 400:  # a redirect could lead to a private address
            raise ApiError(400, "image URLs that redirect are not followed")
        if response.status != 200:
            raise ApiError(400, f"could not fetch the image URL (HTTP {response.status})")
        data = b""
        while len(data) <= max_bytes:
            if time.monotonic() > deadline:
                raise ApiError(400, f"the image URL took more than {timeout:g} s")
            chunk = response.read(min(65536, max_bytes + 1 - len(data)))
            if not chunk:
                break
            data += chunk
    except ApiError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise ApiError(400, f"could not fetch the image URL ({e})") from None
    finally:
        connection.close()
    if len(data) > max_bytes:
        raise ApiError(413, f"the image at the URL is over {max_bytes} bytes")
    return data
