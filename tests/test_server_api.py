"""Plain-HTTP contract of /sdapi/v1: field names and defaults as the web UI documents them, response
shapes, and errors in its shape with 4xx statuses (never a 500 for bad input)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

import stablekit
from stablekit.server.app import create_app
from stablekit.server.config import Limits, ServerConfig

from .server_support import b64_png, centre_mask, from_b64, picture

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

SMALL = {"width": 64, "height": 64, "steps": 2}

# The web UI's API defaults (modules/api/models.py built from modules/processing.py, v1.9/1.10).
TXT2IMG_DEFAULTS = {
    "prompt": "", "negative_prompt": "", "seed": -1, "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": -1,
    "seed_resize_from_w": -1, "sampler_name": None, "scheduler": None, "batch_size": 1, "n_iter": 1, "steps": 50,
    "cfg_scale": 7.0, "width": 512, "height": 512, "eta": None, "denoising_strength": 0.75, "override_settings": None,
    "override_settings_restore_afterwards": True, "enable_hr": False, "hr_scale": 2.0, "hr_second_pass_steps": 0,
    "hr_resize_x": 0, "hr_resize_y": 0, "hr_prompt": "", "hr_negative_prompt": "", "hr_upscaler": None,
    "hr_sampler_name": None, "hr_scheduler": None, "hr_checkpoint_name": None, "sampler_index": "Euler",
    "script_name": None, "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {},
    "firstphase_width": 0, "firstphase_height": 0, "do_not_save_samples": False, "do_not_save_grid": False,
}
IMG2IMG_DEFAULTS = {
    **{k: v for k, v in TXT2IMG_DEFAULTS.items() if not k.startswith(("hr_", "enable_hr", "firstphase"))},
    "init_images": None, "resize_mode": 0, "denoising_strength": 0.75, "image_cfg_scale": None, "mask": None,
    "mask_blur_x": 4, "mask_blur_y": 4, "mask_blur": None, "mask_round": True, "inpainting_fill": 0,
    "inpaint_full_res": True, "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0,
    "initial_noise_multiplier": None, "latent_mask": None, "include_init_images": False,
}
INFO_KEYS = {"prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
             "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
             "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash",
             "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "extra_generation_params",
             "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip",
             "is_using_inpainting_conditioning", "version"}
ERROR_KEYS = {"error", "detail", "body", "errors"}


@pytest.fixture(scope="module")
def engine(tiny_models):
    return stablekit.load(tiny_models["sd1"].single_file)


@pytest.fixture(scope="module")
def client(tiny_models, engine, tmp_path_factory):
    config = ServerConfig(model=str(tiny_models["sd1"].single_file), outputs=tmp_path_factory.mktemp("out"),
                          limits=Limits(max_pixels=256 * 256, max_steps=80, max_batch=4, queue_size=2))
    app = create_app(config, loader=lambda spec: engine)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def assert_error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == ERROR_KEYS
    assert "Traceback" not in r.text
    return body


def test_request_models_have_the_web_uis_field_names_and_defaults(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for name, expected in (("Txt2ImgRequest", TXT2IMG_DEFAULTS), ("Img2ImgRequest", IMG2IMG_DEFAULTS)):
        props = schemas[name]["properties"]
        for field, default in expected.items():
            assert field in props, f"{name} lacks {field}"
            assert props[field].get("default") == default, f"{name}.{field}: {props[field].get('default')!r} != {default!r}"


def test_txt2img_defaults_and_response_shape(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a boat", "width": 64, "height": 64})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"}
    info = json.loads(body["info"])
    assert INFO_KEYS <= set(info)
    assert info["steps"] == 50 and info["sampler_name"] == "Euler" and info["cfg_scale"] == 7.0
    assert 0 <= info["seed"] < 2**32 and info["all_seeds"] == [info["seed"]]  # -1 became a concrete seed
    assert body["parameters"]["seed"] == -1 and body["parameters"]["sampler_index"] == "Euler"
    image = from_b64(body["images"][0])
    assert image.format == "PNG" and image.size == (64, 64)
    assert image.info["parameters"] == info["infotexts"][0]
    assert "Steps: 50, Sampler: Euler" in info["infotexts"][0]


def test_sampler_name_wins_over_sampler_index_and_eta_is_dropped_where_unused(client, engine):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "p", "seed": 4, "sampler_index": "DDIM",
                                               "sampler_name": "DPM++ 2M", "scheduler": "karras", "eta": 0.7})
    info = json.loads(r.json()["info"])
    assert info["sampler_name"] == "DPM++ 2M" and "Schedule type: Karras" in info["infotexts"][0]
    want = engine.txt2img(prompt="p", seed=4, sampler="DPM++ 2M", scheduler="karras", **SMALL)[0]
    assert np.array_equal(np.asarray(from_b64(r.json()["images"][0])), np.asarray(want))


def test_n_iter_continues_the_seeds_and_clip_skip_override(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 10, "batch_size": 2, "n_iter": 2,
                                               "override_settings": {"CLIP_stop_at_last_layers": 2}})
    info = json.loads(r.json()["info"])
    assert len(r.json()["images"]) == 4 and info["all_seeds"] == [10, 11, 12, 13]
    assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]


def test_send_images_false_and_unknown_fields_are_ignored(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "send_images": False, "no_such_field": 1,
                                               "alwayson_scripts": {"ADetailer": {"args": [False]}}})
    assert r.status_code == 200 and r.json()["images"] == []


def test_img2img_echo_hides_the_init_images_unless_asked(client):
    init = b64_png(picture())
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [init], "denoising_strength": 0.5})
    assert r.status_code == 200
    assert r.json()["parameters"]["init_images"] is None
    assert json.loads(r.json()["info"])["denoising_strength"] == 0.5
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": ["data:image/png;base64," + init],
                                               "include_init_images": True})
    assert r.json()["parameters"]["init_images"] == ["data:image/png;base64," + init]


def test_inpainting_mask_invert_and_rgba_masks(client):
    init = picture()
    mask = centre_mask()
    common = {**SMALL, "seed": 2, "init_images": [b64_png(init)], "inpaint_full_res": False, "mask_blur": 0,
              "denoising_strength": 1.0}
    plain = client.post("/sdapi/v1/img2img", json={**common, "mask": b64_png(mask)})
    inverted = client.post("/sdapi/v1/img2img", json={**common, "mask": b64_png(mask.point(lambda v: 255 - v)),
                                                      "inpainting_mask_invert": 1})
    rgba = mask.convert("RGBA")
    rgba.putalpha(mask)  # the web UI reads a transparent mask's alpha: opaque repaints
    alpha = client.post("/sdapi/v1/img2img", json={**common, "mask": b64_png(rgba)})
    a, b, c = (np.asarray(from_b64(r.json()["images"][0])) for r in (plain, inverted, alpha))
    assert np.array_equal(a, b) and np.array_equal(a, c)
    keep = np.asarray(mask) == 0
    assert np.array_equal(a[keep], np.asarray(init)[keep])


def test_progress_when_idle(client):
    body = client.get("/sdapi/v1/progress").json()
    assert body["progress"] == 0 and body["eta_relative"] == 0
    assert {"skipped", "interrupted", "job", "job_count", "job_no", "sampling_step", "sampling_steps"} <= set(body["state"])
    assert body["state"]["job_count"] == 0


def test_skip_ends_the_current_batch_only(client, engine):
    out = {}
    body = {"prompt": "p", "width": 64, "height": 64, "steps": 40, "seed": 30, "n_iter": 2, "sampler_name": "Euler"}
    run = threading.Thread(target=lambda: out.update(r=client.post("/sdapi/v1/txt2img", json=body)))
    run.start()
    for _ in range(1200):
        state = client.get("/sdapi/v1/progress?skip_current_image=true").json()["state"]
        if state["sampling_step"] > 0 and state["job_no"] == 0:
            break
        time.sleep(0.05)
    client.post("/sdapi/v1/skip")
    run.join(timeout=300)
    images = [np.asarray(from_b64(i)) for i in out["r"].json()["images"]]
    assert len(images) == 2
    first, second = (engine.txt2img(prompt="p", width=64, height=64, steps=40, seed=s, sampler="Euler")[0]
                     for s in (30, 31))  # n_iter 2 x batch 1: seeds 30 and 31
    assert not np.array_equal(images[0], np.asarray(first))  # the first batch stopped early ...
    assert np.array_equal(images[1], np.asarray(second))  # ... the next one ran in full


def test_lists_options_and_memory(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    assert "Euler a" in {s["name"] for s in samplers}
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert {"name", "label", "aliases", "default_rho", "need_inner_model"} <= set(schedulers[0])
    assert {"name": "karras", "label": "Karras"}.items() <= next(s for s in schedulers if s["name"] == "karras").items()
    models = client.get("/sdapi/v1/sd-models").json()
    assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == models[0]["title"] and options["CLIP_stop_at_last_layers"] == 1
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
    client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})
    memory = client.get("/sdapi/v1/memory").json()
    assert {"ram", "cuda"} <= set(memory)


def test_png_info_of_a_picture_without_infotext(client):
    r = client.post("/sdapi/v1/png-info", json={"image": b64_png(picture())})
    assert r.status_code == 200 and r.json()["info"] == "" and r.json()["parameters"] == {}


@pytest.mark.parametrize("path, body, status, words", [
    ("/sdapi/v1/txt2img", {"steps": "many"}, 422, "steps"),
    ("/sdapi/v1/txt2img", {"width": 100, "height": 64, "steps": 2}, 400, "multiple of 8"),
    ("/sdapi/v1/txt2img", {**SMALL, "sampler_name": "Nonesuch"}, 400, "unknown sampler"),
    ("/sdapi/v1/txt2img", {**SMALL, "scheduler": "wobbly"}, 400, "wobbly"),
    ("/sdapi/v1/txt2img", {**SMALL, "enable_hr": True, "hr_checkpoint_name": "other"}, 400, "hr_checkpoint_name"),
    ("/sdapi/v1/txt2img", {**SMALL, "enable_hr": True, "hr_scale": 0.5}, 400, "hires scale"),
    ("/sdapi/v1/txt2img", {**SMALL, "enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, 400, "ESRGAN_4x"),
    ("/sdapi/v1/txt2img", {**SMALL, "subseed_strength": 1.5}, 400, "subseed strength"),
    ("/sdapi/v1/txt2img", {**SMALL, "script_name": "x/y/z plot"}, 400, "script_name"),
    ("/sdapi/v1/txt2img", {**SMALL, "alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}}, 400, "ControlNet"),
    ("/sdapi/v1/txt2img", {**SMALL, "width": 512, "height": 512}, 400, "limit"),
    ("/sdapi/v1/txt2img", {**SMALL, "steps": 81}, 400, "limit"),
    ("/sdapi/v1/txt2img", {**SMALL, "batch_size": 3, "n_iter": 2}, 400, "limit"),
    ("/sdapi/v1/txt2img", {**SMALL, "seed": -5}, 400, "seed"),
    ("/sdapi/v1/txt2img", {**SMALL, "override_settings": {"sd_model_checkpoint": "nope.safetensors"}}, 400, "unknown checkpoint"),
    ("/sdapi/v1/img2img", {**SMALL}, 404, "Init image not found"),
    ("/sdapi/v1/img2img", {**SMALL, "init_images": ["not base64!"]}, 400, "init_images[0]"),
    ("/sdapi/v1/img2img", {**SMALL, "init_images": ["aGVsbG8="]}, 400, "not a readable picture"),
    ("/sdapi/v1/img2img", {**SMALL, "init_images": [b64_png(picture())], "resize_mode": 3}, 400, "resize_mode"),
    ("/sdapi/v1/img2img", {**SMALL, "init_images": [b64_png(picture())], "mask": b64_png(centre_mask()),
                           "inpainting_fill": 7}, 400, "inpainting_fill"),
    ("/sdapi/v1/img2img", {**SMALL, "init_images": [b64_png(picture())], "mask": b64_png(centre_mask()),
                           "mask_blur_x": 2, "mask_blur_y": 6}, 400, "mask_blur"),
    ("/sdapi/v1/png-info", {"image": "@@@"}, 400, "image"),
    ("/sdapi/v1/png-info", {}, 422, "image"),
    ("/sdapi/v1/options", {"sd_model_checkpoint": "../../etc/passwd"}, 400, "unknown checkpoint"),
    ("/sdapi/v1/options", {"CLIP_stop_at_last_layers": "two"}, 400, "CLIP_stop_at_last_layers"),
])
def test_bad_input_gets_a_4xx_in_the_web_uis_error_shape(client, path, body, status, words):
    error = assert_error(client.post(path, json=body), status)
    assert words in error["errors"]


def test_malformed_json_is_a_422(client):
    r = client.post("/sdapi/v1/txt2img", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(r, 422)


def test_engine_refusals_are_400_and_inpainting_models_work(tiny_models, tmp_path):
    config = ServerConfig(model=str(tiny_models["sd1-inpaint"].single_file), outputs=tmp_path)
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        error = assert_error(c.post("/sdapi/v1/txt2img", json=SMALL), 400)
        assert "base model" in error["errors"]
        r = c.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64_png(picture())],
                                              "mask": b64_png(centre_mask()), "denoising_strength": 1.0})
        assert r.status_code == 200
        info = json.loads(r.json()["info"])
        assert info["is_using_inpainting_conditioning"] is True and "Conditional mask weight" in info["infotexts"][0]


def test_openapi_docs_list_every_route(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for route in ("txt2img", "img2img", "progress", "interrupt", "skip", "sd-models", "samplers", "schedulers",
                  "options", "png-info", "memory"):
        assert f"/sdapi/v1/{route}" in paths
    assert {"/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/events",
            "/api/v1/jobs/{job_id}/images/{index}"} <= set(paths)


def test_serve_reports_a_bad_checkpoint_without_a_traceback(tmp_path, capsys):
    from stablekit.cli import main

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    assert main(["serve", "--model", str(junk), "--outputs", str(tmp_path / "out"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "junk.safetensors" in err and "Traceback" not in err
