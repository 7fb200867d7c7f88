"""The ControlNet extension's API on `stablekit serve`: alwayson_scripts units, the /controlnet routes,
webuiapi's ControlNet helpers unchanged, and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

import stablekit
from stablekit.pipeline.control import ControlUnit
from stablekit.server.app import create_app
from stablekit.server.config import Limits, ServerConfig

from .server_support import Server, b64_png, from_b64, picture

pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module")
def cn_dir(tiny_controlnets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnet_models")
    for k, net in enumerate(tiny_controlnets["sd1"]):
        (folder / f"control_v11p_sd15_tiny{k}.safetensors").symlink_to(net.single)
    return folder


@pytest.fixture(scope="module")
def engine(tiny_models, cn_dir):
    return stablekit.load(tiny_models["sd1"].single_file, controlnet_dir=cn_dir)


@pytest.fixture(scope="module")
def client(tiny_models, engine, cn_dir, tmp_path_factory):
    config = ServerConfig(model=str(tiny_models["sd1"].single_file), outputs=tmp_path_factory.mktemp("out"),
                          controlnet_dir=cn_dir, limits=Limits(max_controls=2))
    with TestClient(create_app(config, loader=lambda spec: engine), raise_server_exceptions=False) as c:
        yield c


def unit(**fields):
    return {"enabled": True, "model": "control_v11p_sd15_tiny0", "image": b64_png(picture(SIZE, SIZE, seed=3)),
            "module": "none", "resize_mode": "Just Resize", **fields}


def body(*units, **fields):
    return {"prompt": "a red barn", "steps": 4, "width": SIZE, "height": SIZE, "seed": 5, "sampler_name": "Euler",
            "alwayson_scripts": {"ControlNet": {"args": list(units)}}, **fields}


def test_model_and_module_lists(client, engine):
    models = client.get("/controlnet/model_list").json()["model_list"]
    assert models == sorted(models) and len(models) == 2
    assert models[0] == engine.controlnet("control_v11p_sd15_tiny0").label
    modules = client.get("/controlnet/module_list").json()
    assert {"none", "canny", "depth_midas"} <= set(modules["module_list"])
    canny = modules["module_detail"]["canny"]["sliders"]
    assert [s["value"] for s in canny] == [512, 100, 200]
    assert client.get("/controlnet/version").json() == {"version": 3}
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 2}


def test_txt2img_with_a_unit_equals_the_engine_and_returns_the_map(client, engine, cn_dir):
    r = client.post("/sdapi/v1/txt2img", json=body(unit(weight=0.7, guidance_end=0.5)))
    assert r.status_code == 200, r.text
    images = [np.asarray(from_b64(i).convert("RGB")) for i in r.json()["images"]]
    assert len(images) == 2  # the picture, then the detected map (save_detected_map defaults to true)
    assert np.array_equal(images[1], np.asarray(picture(SIZE, SIZE, seed=3)))  # module none: the map is the picture
    p = stablekit.GenerationParams(prompt="a red barn", steps=4, width=SIZE, height=SIZE, seed=5, sampler="Euler",
                                   cfg_scale=7.0)
    ours = engine.txt2img(p, controls=(ControlUnit("control_v11p_sd15_tiny0", image=picture(SIZE, SIZE, seed=3),
                                                   weight=0.7, end=0.5, resize="just-resize"),))[0]
    assert np.array_equal(images[0], np.asarray(ours))
    info = json.loads(r.json()["info"])
    assert 'ControlNet 0: "Module: none, Model: control_v11p_sd15_tiny0 [' in info["infotexts"][0]
    plain = client.post("/sdapi/v1/txt2img", json=body(unit(enabled=False))).json()["images"]
    assert len(plain) == 1 and not np.array_equal(np.asarray(from_b64(plain[0]).convert("RGB")), images[0])


def test_img2img_unit_without_a_picture_reads_the_init_image(client):
    init = b64_png(picture(SIZE, SIZE, seed=1))
    r = client.post("/sdapi/v1/img2img", json=body(unit(image="", save_detected_map=False), init_images=[init],
                                                  denoising_strength=0.6))
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1


def square(size: int = SIZE):
    from PIL import Image

    image = Image.new("RGB", (size, size), (0, 0, 0))
    image.paste((255, 255, 255), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image


def test_detect_writes_canny_edges(client):
    r = client.post("/controlnet/detect", json={"controlnet_module": "canny",
                                                "controlnet_input_images": [b64_png(square())],
                                                "controlnet_threshold_a": 50, "controlnet_threshold_b": 100})
    assert r.status_code == 200, r.text
    edges = np.asarray(from_b64(r.json()["images"][0]).convert("L"))
    assert set(np.unique(edges)) <= {0, 255} and edges.max() == 255


@pytest.mark.parametrize("units, words", [
    ([unit(model="no_such_net")], "unknown ControlNet 'no_such_net'"),
    ([unit(model="../../etc/passwd")], "unknown ControlNet"),
    ([unit(module="no_such_module")], "unknown module 'no_such_module'"),
    ([unit(weight=3.0)], "weight must be in 0..2"),
    ([unit(guidance_start=0.8, guidance_end=0.2)], "start <= end"),
    ([unit(image="bm90IGEgcGljdHVyZQ==")], "not a readable picture"),
    ([unit(mask=b64_png(picture(SIZE, SIZE)))], "masks are not supported"),
    ([unit(), unit(), unit()], "over this server's limit of 2"),
    ([unit(control_mode="Loudest")], "control_mode must be one of"),
    (["positional"], "must be an object"),
])
def test_bad_units_are_400_naming_the_problem(client, units, words):
    r = client.post("/sdapi/v1/txt2img", json=body(*units))
    assert r.status_code == 400, r.text
    assert words in r.text


def test_unknown_detect_module_is_400(client):
    r = client.post("/controlnet/detect", json={"controlnet_module": "nope", "controlnet_input_images": ["x"]})
    assert r.status_code == 400 and "unknown module 'nope'" in r.text


webuiapi = pytest.importorskip("webuiapi")


def test_webuiapi_controlnet_helpers(tiny_models, cn_dir, tmp_path, engine):
    srv = Server(tiny_models["sd1"].single_file, tmp_path, "--controlnet-dir", str(cn_dir))
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=srv.port)
        models = api.controlnet_model_list()
        assert len(models) == 2 and "canny" in api.controlnet_module_list()
        control = square()
        cn = webuiapi.ControlNetUnit(image=control, module="canny", model=models[1], weight=0.9,
                                     resize_mode="Just Resize")
        result = api.txt2img(prompt="a red barn", steps=4, width=SIZE, height=SIZE, seed=8, sampler_name="Euler",
                             cfg_scale=7, controlnet_units=[cn],
                             alwayson_scripts={})  # webuiapi adds the units to its shared default dict otherwise
        assert len(result.images) == 2  # the picture and the canny map
        edges = np.asarray(result.images[1].convert("L"))
        assert set(np.unique(edges)) <= {0, 255}
        p = stablekit.GenerationParams(prompt="a red barn", steps=4, width=SIZE, height=SIZE, seed=8, sampler="Euler",
                                       cfg_scale=7.0)
        # webuiapi's unit defaults: processor_res 512, thresholds 64 / 64
        ours = engine.txt2img(p, controls=(ControlUnit(models[1], image=control, module="canny", weight=0.9,
                                                       resize="just-resize", processor_res=512, threshold_a=64,
                                                       threshold_b=64),))[0]
        assert np.array_equal(np.asarray(result.images[0].convert("RGB")), np.asarray(ours))
        detected = api.controlnet_detect([control], module="canny")
        assert len(detected.images) == 1 and np.asarray(detected.images[0].convert("L")).max() == 255
    finally:
        srv.stop()
