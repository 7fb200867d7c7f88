"""The browser UI's serving and the one API field added for it (inpainting_method), over plain HTTP.
The page itself is tested in a real browser in test_ui_browser.py."""

from __future__ import annotations

import pytest

import stablekit
from stablekit.server.app import create_app
from stablekit.server.config import ServerConfig
from stablekit.server.ui import STATIC

from .server_support import b64_png, centre_mask, picture

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


@pytest.fixture(scope="module")
def client(tiny_models, tmp_path_factory):
    engine = stablekit.load(tiny_models["sd1"].single_file)
    config = ServerConfig(model=str(tiny_models["sd1"].single_file), outputs=tmp_path_factory.mktemp("out"),
                          token="apiuser-token-123")
    with TestClient(create_app(config, loader=lambda spec: engine), raise_server_exceptions=False) as c:
        yield c


AUTH = {"Authorization": "Bearer apiuser-token-123"}


def test_page_and_modules_are_served_without_credentials_but_the_api_is_not(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    assert b'src="ui/app.js"' in page.content and b'href="ui/style.css"' in page.content
    for name in ("app.js", "api.js", "canvas.js", "gallery.js", "infotext.js", "style.css"):
        assert (STATIC / name).is_file()
        assert client.get(f"/ui/{name}").status_code == 200
    assert client.get("/ui/../app.py").status_code == 404
    assert client.get("/api/v1/jobs").status_code == 401  # the page holds no data; the API asks for credentials
    assert client.get("/api/v1/jobs", headers=AUTH).status_code == 200


def test_inpainting_method_field(client):
    body = {"width": 64, "height": 64, "steps": 2, "seed": 1, "init_images": [b64_png(picture())],
            "mask": b64_png(centre_mask()), "denoising_strength": 1.0, "inpaint_full_res": False}
    ok = client.post("/sdapi/v1/img2img", json={**body, "inpainting_method": "blend"}, headers=AUTH)
    assert ok.status_code == 200, ok.text
    bad = client.post("/sdapi/v1/img2img", json={**body, "inpainting_method": "bogus"}, headers=AUTH)
    assert bad.status_code == 400 and "unknown inpainting method 'bogus'" in bad.json()["detail"]
    model = client.post("/sdapi/v1/img2img", json={**body, "inpainting_method": "model"}, headers=AUTH)
    assert model.status_code == 400  # a 4-channel model cannot do the 9-channel method: said, not ignored
    assert model.json()["detail"]


def test_options_tell_the_loaded_models_resolution(client, tiny_models):
    options = client.get("/sdapi/v1/options", headers=AUTH).json()
    assert options["stablekit_model_resolution"] == stablekit.load(tiny_models["sd1"].single_file).config.resolution


def test_the_page_works_offline():
    """Nothing is fetched from elsewhere: no external scripts, styles, fonts or images."""
    for path in STATIC.iterdir():
        text = path.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path.name
