"""Security: credentials, path traversal through every string field, oversized uploads and
pictures, URL init images (off by default, never from local addresses), bind policy, CORS."""

from __future__ import annotations

import base64
import http.server
import io
import re
import threading
import typing

import numpy as np
import pytest
from PIL import Image

import stablekit
from stablekit.cli import main
from stablekit.server.api_models import Img2ImgRequest, Txt2ImgRequest
from stablekit.server.app import create_app
from stablekit.server.config import Limits, ServerConfig
from stablekit.server.security import check_bind

from .server_support import b64_png, centre_mask, picture

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

SMALL = {"width": 64, "height": 64, "steps": 1, "seed": 1}
TOKEN = "token-0123456789"


@pytest.fixture(scope="module")
def engine(tiny_models):
    return stablekit.load(tiny_models["sd1"].single_file)


def client_for(tiny_models, engine, outputs, **config) -> TestClient:
    cfg = ServerConfig(model=str(tiny_models["sd1"].single_file), outputs=outputs, **config)
    return TestClient(create_app(cfg, loader=lambda spec: engine), raise_server_exceptions=False)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def authed(tiny_models, engine, tmp_path_factory):
    with client_for(tiny_models, engine, tmp_path_factory.mktemp("auth"), basic_auth=(("user1", "pw1"), ("user2", "pw2")),
                    token=TOKEN) as c:
        yield c


@pytest.mark.parametrize("headers", [
    {}, basic("user1", "wrong"), basic("user2", "pw1"), basic("intruder", "pw1"), {"Authorization": "Bearer nope"},
    {"Authorization": "Basic !!!not-base64"}, {"Authorization": f"Token {TOKEN}"}, {"Authorization": "Basic"},
])
def test_missing_or_wrong_credentials_get_401(authed, headers):
    for method, path, body in (("GET", "/sdapi/v1/options", None), ("POST", "/sdapi/v1/txt2img", SMALL),
                               ("GET", "/sdapi/v1/progress", None), ("POST", "/api/v1/jobs", SMALL),
                               ("GET", "/api/v1/jobs", None), ("POST", "/sdapi/v1/interrupt", None)):
        r = authed.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (method, path, headers)
        assert set(r.json()) == {"error", "detail", "body", "errors"} and "WWW-Authenticate" in r.headers


@pytest.mark.parametrize("headers", [basic("user1", "pw1"), basic("user2", "pw2"), {"Authorization": f"Bearer {TOKEN}"}])
def test_right_credentials_get_in(authed, headers):
    assert authed.get("/sdapi/v1/options", headers=headers).status_code == 200
    assert authed.post("/sdapi/v1/txt2img", json=SMALL, headers=headers).status_code == 200


def _string_fields(model) -> list[str]:
    def has_str(tp) -> bool:
        return tp is str or any(has_str(a) for a in typing.get_args(tp))
    return [name for name, f in model.model_fields.items() if has_str(f.annotation)]


def test_path_traversal_through_every_string_field(tiny_models, engine, tmp_path):
    outputs = tmp_path / "outputs"
    evil = [f"../../{tmp_path.name}/evil", str(tmp_path / "evil-abs"), "..\\..\\evil", "%2e%2e%2fevil", "evil\x00.png"]
    fields = {"txt2img": _string_fields(Txt2ImgRequest), "img2img": _string_fields(Img2ImgRequest)}
    assert {"prompt", "negative_prompt", "sampler_name", "scheduler", "force_task_id", "infotext", "mask"} <= set(fields["img2img"])
    init = b64_png(picture())
    statuses = set()
    with client_for(tiny_models, engine, outputs, limits=Limits(queue_size=64)) as client:
        for task, names in fields.items():
            base = {**SMALL, "save_images": True, **({"init_images": [init]} if task == "img2img" else {})}
            for name in names:
                for value in evil:
                    body = {**base, name: value}
                    r = client.post(f"/sdapi/v1/{task}", json=body)
                    statuses.add(r.status_code)
                    assert r.status_code in (200, 400, 404, 422), (name, value, r.text)
            for value in evil:  # strings nested in lists and dicts
                nested = [{"styles": [value]}, {"override_settings": {"sd_model_checkpoint": value}}]
                if task == "img2img":  # txt2img ignores init_images, as any unknown field
                    nested.append({"init_images": [value]})
                for extra in nested:
                    r = client.post(f"/sdapi/v1/{task}", json={**base, **extra})
                    assert r.status_code in (400, 404, 422), (extra, r.text)
                r = client.post("/api/v1/jobs", json={**base, "task": task, "prompt": value, "force_task_id": value})
                assert r.status_code == 202
    assert 200 in statuses and 400 in statuses
    outside = [p for p in tmp_path.rglob("*") if outputs not in p.parents and p != outputs]
    assert outside == [], outside  # nothing was written anywhere but the outputs folder
    names = [p.relative_to(outputs).as_posix() for p in outputs.rglob("*.png")]
    assert names and all(re.fullmatch(r"[0-9a-f]{32}/\d{5}-\d+\.png", n) for n in names)


def test_oversized_uploads_are_refused_before_decoding(tiny_models, engine, tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    big = b64_png(Image.fromarray(noise))  # ~640 kB of base64
    huge = Image.new("RGB", (1024, 1024), (10, 20, 30))  # small file, many pixels
    with client_for(tiny_models, engine, tmp_path, limits=Limits(max_upload_bytes=200_000,
                                                                  max_input_pixels=512 * 512)) as client:
        r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [big]})
        assert r.status_code == 413 and set(r.json()) == {"error", "detail", "body", "errors"}

        def chunks():  # no Content-Length: the limit is counted as the body arrives
            payload = ('{"init_images": ["' + big + '"]}').encode()
            for i in range(0, len(payload), 65536):
                yield payload[i:i + 65536]
        r = client.post("/sdapi/v1/img2img", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64_png(huge)]})
        assert r.status_code == 413 and "1024x1024" in r.json()["errors"]
        r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64_png(picture())],
                                                   "mask": b64_png(huge.convert("L"))})
        assert r.status_code == 413
        r = client.post("/sdapi/v1/png-info", json={"image": b64_png(huge)})
        assert r.status_code == 413


class _Counter(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).hits += 1
        buf = io.BytesIO()
        picture().save(buf, format="PNG")
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(buf.getvalue())

    def log_message(self, *args):
        pass


@pytest.fixture()
def local_http():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Counter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Counter.hits = 0
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("allow", [False, True])
def test_url_init_images_never_reach_local_addresses(tiny_models, engine, tmp_path, local_http, allow):
    urls = [f"http://127.0.0.1:{local_http}/x.png", f"http://localhost:{local_http}/x.png",
            f"http://[::1]:{local_http}/x.png", "http://10.0.0.1/x.png", "http://169.254.169.254/latest/meta-data",
            "http://192.168.1.1/x.png", f"http://0.0.0.0:{local_http}/x.png"]
    with client_for(tiny_models, engine, tmp_path, allow_url_images=allow) as client:
        for url in urls:
            for body in ({"init_images": [url]}, {"init_images": [b64_png(picture())], "mask": url}):
                r = client.post("/sdapi/v1/img2img", json={**SMALL, **body})
                assert r.status_code == 400, (url, r.text)
                assert ("disabled" if not allow else "local or private") in r.json()["errors"]
    assert _Counter.hits == 0  # the server never fetched anything from this machine


def test_listening_beyond_loopback_needs_auth_or_insecure(tiny_models, capsys):
    open_config = ServerConfig(model="m")
    with pytest.raises(ValueError, match="without authentication"):
        check_bind("0.0.0.0", open_config, insecure=False)
    check_bind("0.0.0.0", open_config, insecure=True)
    check_bind("0.0.0.0", ServerConfig(model="m", token=TOKEN), insecure=False)
    check_bind("127.0.0.1", open_config, insecure=False)
    check_bind("::1", open_config, insecure=False)
    assert main(["serve", "--model", str(tiny_models["sd1"].single_file), "--host", "0.0.0.0"]) == 2
    assert "without authentication" in capsys.readouterr().err
    assert main(["serve", "--model", "m", "--api-auth", "nopassword"]) == 2


def test_cors_is_off_unless_configured(tiny_models, engine, tmp_path):
    preflight = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    with client_for(tiny_models, engine, tmp_path / "a") as client:
        r = client.get("/sdapi/v1/options", headers={"Origin": "https://elsewhere.example"})
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in client.options("/sdapi/v1/txt2img", headers=preflight).headers
    with client_for(tiny_models, engine, tmp_path / "b", cors_origins=("https://ok.example",)) as client:
        r = client.get("/sdapi/v1/options", headers={"Origin": "https://ok.example"})
        assert r.headers["access-control-allow-origin"] == "https://ok.example"
        r = client.get("/sdapi/v1/options", headers={"Origin": "https://elsewhere.example"})
        assert "access-control-allow-origin" not in r.headers


def test_mask_and_init_picture_are_not_read_from_paths(tiny_models, engine, tmp_path):
    secret = tmp_path / "secret.png"
    picture().save(secret)
    with client_for(tiny_models, engine, tmp_path / "out") as client:
        for value in (str(secret), f"file://{secret}"):
            r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [value]})
            assert r.status_code == 400
            r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64_png(picture())],
                                                       "mask": value, "inpaint_full_res": False})
            assert r.status_code == 400
        assert client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64_png(picture())],
                                                      "mask": b64_png(centre_mask())}).status_code == 200
