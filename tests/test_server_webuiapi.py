"""A real client of the web UI's API (`webuiapi` from PyPI), unchanged, against `stablekit serve`.

The server runs in a subprocess with HTTP Basic auth, a models folder of tiny checkpoints and
the client's own defaults (sampler "Euler a", eta 1, ...). Pictures are compared with the same
parameters run directly on an Engine in this process.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import stablekit
from stablekit import GenerationParams

from .server_support import Server, centre_mask, picture

webuiapi = pytest.importorskip("webuiapi")

USER, PASSWORD = "apiuser", "s3cret-pass"
SIZE = 64


@pytest.fixture(scope="module")
def models_dir(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    for family in ("sd1", "sd2"):
        tiny = tiny_models[family]
        (folder / tiny.single_file.name).symlink_to(tiny.single_file)
        sidecar = tiny.single_file.with_suffix(".yaml")
        if sidecar.exists():
            (folder / sidecar.name).symlink_to(sidecar)
    return folder


@pytest.fixture(scope="module")
def server(tiny_models, models_dir, tmp_path_factory):
    srv = Server(models_dir / tiny_models["sd1"].single_file.name, tmp_path_factory.mktemp("webuiapi"),
                 "--models-dir", str(models_dir), auth=(USER, PASSWORD))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username=USER, password=PASSWORD)


@pytest.fixture(scope="module")
def engine(tiny_models):
    return stablekit.load(tiny_models["sd1"].single_file)


def local(**fields) -> GenerationParams:
    """What webuiapi sends by default: sampler "Euler a", eta 1, cfg 7; here at 64x64."""
    base = dict(prompt="a red barn", sampler="Euler a", eta=1.0, cfg_scale=7.0, width=SIZE, height=SIZE)
    return GenerationParams(**{**base, **fields})


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_txt2img_matches_the_engine(api, engine):
    result = api.txt2img(prompt="a red barn", seed=11, steps=4, width=SIZE, height=SIZE, batch_size=2)
    assert len(result.images) == 2
    assert result.info["all_seeds"] == [11, 12]
    assert result.info["sampler_name"] == "Euler a" and result.info["steps"] == 4
    assert "Seed: 11" in result.images[0].info["parameters"]
    expected = engine.txt2img(local(seed=11, steps=4, batch_size=2))
    for got, want in zip(result.images, expected):
        assert np.array_equal(pixels(got), pixels(want))


def test_img2img_matches_the_engine(api, engine):
    init = picture(SIZE, SIZE)
    result = api.img2img(images=[init], prompt="a red barn", seed=3, steps=6, denoising_strength=0.5,
                         width=SIZE, height=SIZE)
    assert result.info["denoising_strength"] == 0.5
    expected = engine.img2img(init, local(seed=3, steps=6, denoising_strength=0.5))
    assert np.array_equal(pixels(result.image), pixels(expected[0]))


def test_inpainting_with_a_mask_matches_the_engine_and_keeps_the_rest(api, engine):
    init, mask = picture(SIZE, SIZE, seed=5), centre_mask(SIZE, SIZE)
    result = api.img2img(images=[init], mask_image=mask, inpainting_fill=1, inpaint_full_res=False, mask_blur=2,
                         prompt="a red barn", seed=7, steps=5, denoising_strength=0.9, width=SIZE, height=SIZE)
    expected = engine.inpaint(init, mask, local(seed=7, steps=5, denoising_strength=0.9, masked_content="original",
                                                mask_blur=2.0, inpaint_area="whole"))
    got = pixels(result.image)
    assert np.array_equal(got, pixels(expected[0]))
    far = np.ones((SIZE, SIZE), bool)  # well outside the blurred edge the picture is untouched
    far[SIZE // 4 - 8: 3 * SIZE // 4 + 8, SIZE // 4 - 8: 3 * SIZE // 4 + 8] = False
    assert np.array_equal(got[far], pixels(init)[far])
    assert not np.array_equal(got[~far], pixels(init)[~far])


def test_only_masked_inpainting_is_the_api_default(api, engine):
    init, mask = picture(96, 80, seed=2), centre_mask(96, 80)
    result = api.img2img(images=[init], mask_image=mask, prompt="a red barn", seed=9, steps=4, width=SIZE, height=SIZE)
    assert result.image.size == (96, 80)  # only-masked puts the crop back into the picture at its own size
    assert result.parameters["inpaint_full_res"] is True
    expected = engine.inpaint(init, mask, local(seed=9, steps=4, masked_content="fill", mask_blur=4.0,
                                                inpaint_area="masked", inpaint_padding=0))
    assert np.array_equal(pixels(result.image), pixels(expected[0]))


def test_progress_polling_and_interrupt(api, engine):
    steps = 60  # long enough to be caught mid-run: the client interrupts as soon as a step is reported
    out = {}
    run = threading.Thread(target=lambda: out.update(result=api.txt2img(
        prompt="a red barn", seed=21, steps=steps, width=SIZE, height=SIZE)))
    run.start()
    seen = None
    for _ in range(600):  # poll until sampling is under way (bounded)
        progress = api.get_progress()
        if progress["state"]["sampling_step"] > 0:
            seen = progress
            break
        time.sleep(0.05)
    assert seen is not None, "no progress reported"
    assert 0 < seen["progress"] <= 1 and seen["state"]["job_count"] == 1
    assert seen["state"]["sampling_steps"] == steps
    assert seen["current_image"]  # the cheap latent preview, base64 PNG
    api.interrupt()
    run.join(timeout=300)
    assert not run.is_alive()
    interrupted = out["result"].image
    full = engine.txt2img(local(seed=21, steps=steps))[0]
    assert not np.array_equal(pixels(interrupted), pixels(full))  # it stopped early, with a picture
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_model_list_and_switch_through_options(api):
    names = api.util_get_model_names()
    assert any(n.startswith("tiny-sd1.safetensors [") for n in names)
    sd2 = next(n for n in names if n.startswith("tiny-sd2.safetensors ["))
    before = api.util_get_current_model()
    try:
        api.util_set_model(sd2)
        assert api.util_get_current_model() == sd2
        result = api.txt2img(prompt="x", seed=1, steps=2, width=SIZE, height=SIZE)
        assert "Model: tiny-sd2" in result.image.info["parameters"]
    finally:
        api.util_set_model(before)
    assert api.util_get_current_model() == before


def test_png_info_reads_the_infotext_back(api):
    result = api.txt2img(prompt="a red barn", negative_prompt="fog", seed=5, steps=2, width=SIZE, height=SIZE)
    info = api.png_info(result.image)
    assert info.info == result.image.info["parameters"]
    parsed = info.parameters
    assert parsed["Prompt"] == "a red barn" and parsed["Negative prompt"] == "fog"
    assert parsed["Seed"] == "5" and parsed["Steps"] == "2" and parsed["Sampler"] == "Euler a"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("64", "64")


def test_samplers_and_schedulers_lists(api):
    samplers = api.util_get_sampler_names()
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM"} <= set(samplers)
    assert {"automatic", "karras", "exponential"} <= set(api.util_get_scheduler_names())


def test_wrong_credentials_are_refused(server):
    bad = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username=USER, password="wrong")
    with pytest.raises(RuntimeError) as e:
        bad.txt2img(prompt="x", steps=2, width=SIZE, height=SIZE)
    assert e.value.args[0] == 401
