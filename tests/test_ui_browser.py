"""The browser UI end to end: headless Chromium (Debian's `chromium` package, driven by the
`playwright` package; no browser download) against `stablekit serve` on the shipped demo model.

Screenshots go to test-artifacts/ui/ (git-ignored). Without Chromium these tests fail with a
clear message; only outside CI (the CI variable unset) are they skipped instead.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from stablekit.images import infotext

from .server_support import Server, picture

CHROMIUM = os.environ.get("STABLEKIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]  # containers often have a small /dev/shm
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "ui"
LAPTOP = {"width": 1366, "height": 800}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 120_000  # bounds on a busy machine, not speed requirements


def _unavailable(reason: str) -> None:
    message = f"browser UI tests need {reason}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable('the playwright package (pip install -e ".[test]")')
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        _unavailable(f"Chromium at {CHROMIUM} (apt-get install chromium, or set STABLEKIT_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from stablekit.demo import demo_model

    s = Server(demo_model(), tmp_path_factory.mktemp("ui"), "--max-steps", "1000", env={"OMP_NUM_THREADS": "1"})
    yield s
    s.stop()


def open_page(browser, server, viewport=LAPTOP):
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    return context, page, errors


@pytest.fixture()
def page(browser, server):
    context, page, errors = open_page(browser, server)
    yield page
    context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


def shot(page, name: str, **kwargs) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), **kwargs)


def small_run(page, steps: int, seed: int = 7, prompt: str = "a red circle on a blue background") -> None:
    page.fill("#prompt", prompt)
    for field, value in (("width", 64), ("height", 64), ("steps", steps), ("seed", seed)):
        page.fill(f"#{field}", str(value))


def generate(page, how: str = "click") -> None:
    """Start a run and wait until its result is shown (the page may show an older one before)."""
    before = page.get_attribute("#result", "data-job") or ""
    if how == "keyboard":
        page.focus("#prompt")
        page.keyboard.press("Control+Enter")
    else:
        page.click("#generate")
    page.wait_for_function(f"(document.getElementById('result').dataset.job || '') !== {before!r}")


def wait_step(page, at_least: int) -> None:
    page.wait_for_function(f"Number(document.getElementById('progress').dataset.step || 0) >= {at_least}")


def result_picture(page, server) -> Image.Image:
    job = page.get_attribute("#result", "data-job")
    with urllib.request.urlopen(f"{server.url}/api/v1/jobs/{job}/images/0", timeout=60) as r:
        return Image.open(io.BytesIO(r.read())).convert("RGB")


def png_with_infotext(text: str | None) -> str:
    meta = PngInfo()
    if text is not None:
        meta.add_text("parameters", text)
    buf = io.BytesIO()
    picture(32, 32).save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode()


def drop_png(page, b64: str, target: str = "body") -> None:
    """A real drop event carrying a PNG file, as a file dragged from the desktop gives."""
    page.evaluate("""([b64, target]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
        document.querySelector(target).dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
    }""", [b64, target])


def test_page_is_served_at_root(server):
    with urllib.request.urlopen(server.url + "/", timeout=30) as r:
        assert r.status == 200 and "text/html" in r.headers["content-type"]
        assert b'src="ui/app.js"' in r.read()
    with urllib.request.urlopen(server.url + "/ui/app.js", timeout=30) as r:
        assert r.status == 200 and "javascript" in r.headers["content-type"]


def test_txt2img_progress_preview_and_infotext(page, server):
    assert page.input_value("#width") == page.input_value("#height") == "64"  # the demo model's own size
    samplers = page.eval_on_selector_all("#sampler_name option", "os => os.map(o => o.value)")
    assert "Euler a" in samplers and "DPM++ 2M" in samplers  # the server's list
    assert "karras" in page.eval_on_selector_all("#scheduler option", "os => os.map(o => o.value)")
    small_run(page, steps=160, seed=7)
    before = page.get_attribute("#result", "data-job") or ""
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")  # the keyboard shortcut starts the run
    wait_step(page, 60)
    assert page.is_visible("#preview") and page.get_attribute("#preview", "src").startswith("data:image/png")
    text = page.inner_text("#progress-text")
    assert "/160" in text and "ETA" in text
    shot(page, "txt2img-running.png")
    page.wait_for_function(f"(document.getElementById('result').dataset.job || '') !== {before!r}")
    assert page.eval_on_selector("#result img", "img => img.complete && img.naturalWidth") == 64
    info = page.inner_text("#infotext")
    assert info.startswith("a red circle on a blue background") and "Steps: 160" in info and "Seed: 7" in info
    assert page.is_hidden("#progress") and page.is_disabled("#interrupt")
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "7"
    shot(page, "txt2img-done.png")


def test_inpaint_changes_only_the_painted_region(page, server, tmp_path):
    source = picture(64, 64, seed=3)
    path = tmp_path / "source.png"
    source.save(path)
    page.click("#tab-inpaint")
    page.set_input_files("#init-file", str(path))
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    assert page.input_value("#width") == "64" and page.input_value("#height") == "64"
    page.eval_on_selector("#brush-size", "el => { el.value = 8; el.dispatchEvent(new Event('input')); }")
    # one stroke with real mouse events, from (18, 32) to (46, 32) in picture pixels
    box = page.locator("#mask").bounding_box()
    at = lambda x, y: (box["x"] + x * box["width"] / 64, box["y"] + y * box["height"] / 64)  # noqa: E731
    page.mouse.move(*at(18, 32))
    page.mouse.down()
    page.mouse.move(*at(46, 32), steps=12)
    page.mouse.up()
    for field, value in (("mask_blur", 2), ("denoising_strength", 1), ("steps", 12), ("seed", 5)):
        page.fill(f"#{field}", str(value))
    page.fill("#prompt", "a yellow star")
    page.select_option("#inpainting_fill", "0")  # fill
    page.select_option("#inpaint_area", "whole")
    page.select_option("#inpainting_method", "blend")
    shot(page, "inpaint-mask.png")
    generate(page)
    shot(page, "inpaint-done.png")
    out = np.asarray(result_picture(page, server), dtype=np.int16)
    src = np.asarray(source, dtype=np.int16)
    assert out.shape == src.shape
    y, x = np.mgrid[0:64, 0:64]
    dist = np.hypot(np.clip(x, 18, 46) - x, 32 - y)  # distance to the stroke's centre line
    outside = dist > 4 + 1 + 4 * 2  # brush radius + antialiasing + 4 sigma of the mask blur
    inside = dist <= 3
    assert np.array_equal(out[outside], src[outside]), "pixels outside the painted region changed"
    assert np.abs(out[inside] - src[inside]).mean() > 8, "the painted region was not repainted"
    assert "Mask blur: 2" in page.inner_text("#infotext")
    # "only masked": a box around the mask is repainted at full resolution, then pasted back
    page.select_option("#inpaint_area", "masked")
    page.fill("#inpaint_full_res_padding", "8")
    generate(page)
    assert "Inpaint area: Only masked, Masked area padding: 8" in page.inner_text("#infotext")
    out = np.asarray(result_picture(page, server), dtype=np.int16)
    assert np.array_equal(out[outside], src[outside]) and np.abs(out[inside] - src[inside]).mean() > 8


def test_img2img_from_a_dropped_picture_and_download(page, server, tmp_path):
    page.click("#tab-img2img")
    assert page.is_hidden("#mask-tools") and page.is_hidden("#inpaint-options")
    buf = io.BytesIO()
    picture(48, 40, seed=2).save(buf, format="PNG")
    drop_png(page, base64.b64encode(buf.getvalue()).decode(), "#dropzone")  # the init picture, not PNG info
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    assert page.input_value("#width") == "48" and page.input_value("#height") == "40"
    assert page.is_hidden("#error")
    page.fill("#denoising_strength", "0.5")
    page.fill("#steps", "10")
    page.fill("#seed", "3")
    generate(page)
    assert page.eval_on_selector("#result img", "img => [img.naturalWidth, img.naturalHeight]") == [48, 40]
    assert "Denoising strength: 0.5" in page.inner_text("#infotext")
    with page.expect_download() as download:
        page.click("#download")
    assert download.value.suggested_filename == "stablekit-3.png"
    path = tmp_path / "downloaded.png"
    download.value.save_as(path)
    with Image.open(path) as im:
        assert im.size == (48, 40) and "Denoising strength: 0.5" in im.info["parameters"]


def test_mask_tools_and_outpainting(page, server, tmp_path):
    path = tmp_path / "source.png"
    picture(64, 64).save(path)
    page.click("#tab-inpaint")
    page.set_input_files("#init-file", str(path))
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    painted = "() => { const d = document.getElementById('mask').getContext('2d').getImageData(0, 0, 64, 64).data;" \
              " let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] >= 128; return n; }"
    assert page.evaluate(painted) == 0
    page.click("#mask-invert")
    assert page.evaluate(painted) == 64 * 64
    page.click("#mask-undo")
    assert page.evaluate(painted) == 0
    page.click("#mask-invert")
    page.click("#tool-eraser")  # erase a stroke out of the fully painted mask
    box = page.locator("#mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    assert 0 < page.evaluate(painted) < 64 * 64 - 100
    page.click("#tool-brush")
    page.click("#mask-clear")
    assert page.evaluate(painted) == 0
    page.select_option("#extend-by", "32")
    page.click("[data-extend='right']")  # outpainting: the canvas grows and the new strip is masked
    assert page.eval_on_selector("#picture", "c => [c.width, c.height]") == [96, 64]
    assert page.input_value("#width") == "96" and page.input_value("#inpainting_fill") == "0"
    page.fill("#steps", "8")
    generate(page)
    assert page.eval_on_selector("#result img", "img => [img.naturalWidth, img.naturalHeight]") == [96, 64]


def test_reload_during_a_run_then_interrupt_it(page, server):
    small_run(page, steps=1000, seed=11)
    before = page.get_attribute("#result", "data-job")
    page.click("#generate")
    wait_step(page, 3)
    page.reload()  # the run goes on on the server; the page finds it in the job store and follows it again
    page.wait_for_selector("body[data-ready='1']")
    wait_step(page, 6)
    assert page.is_enabled("#interrupt")
    page.click("#interrupt")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Interrupted at step')")
    assert page.get_attribute("#result", "data-job") not in (None, "", before)
    assert page.eval_on_selector("#result img", "img => img.complete && img.naturalWidth") == 64
    status = page.inner_text("#status")
    assert status.startswith("Interrupted at step") and "/1000" in status
    step = int(status.split("step ")[1].split("/")[0])
    assert step < 1000
    assert page.is_disabled("#interrupt") and page.is_enabled("#generate")


def test_dropping_a_png_fills_the_form(page):
    text = infotext("a green square, on grey", "blurry", {"Steps": 33, "Sampler": "Euler a", "Schedule type": "Karras",
                                                         "CFG scale": 5.5, "Seed": 1234, "Size": "64x48",
                                                         "Model": "shapes-demo"})
    drop_png(page, png_with_infotext(text))
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Filled')")
    values = {f: page.input_value(f"#{f}") for f in ("prompt", "negative_prompt", "steps", "sampler_name", "scheduler",
                                                     "cfg_scale", "seed", "width", "height")}
    assert values == {"prompt": "a green square, on grey", "negative_prompt": "blurry", "steps": "33",
                      "sampler_name": "Euler a", "scheduler": "karras", "cfg_scale": "5.5", "seed": "1234",
                      "width": "64", "height": "48"}
    drop_png(page, png_with_infotext(None))
    page.wait_for_selector("#error:not([hidden])")
    assert "has no infotext" in page.inner_text("#error-text")


def test_server_errors_are_shown(page):
    small_run(page, steps=4)
    page.fill("#width", "100")  # not a multiple of 8: the server refuses it
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error-text")
    assert "The server refused" in message and "width must be a positive multiple of 8" in message and "100" in message
    shot(page, "server-error.png")
    page.click("#error-close")
    page.fill("#width", "64")
    page.fill("#n_iter", "9")  # over this server's --max-batch (8 pictures)
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "9 pictures is over this server's limit of 8" in page.inner_text("#error-text")
    page.fill("#n_iter", "1")
    page.fill("#steps", "")  # bad input is caught before it is sent
    page.click("#generate")
    assert "Steps must be a number" in page.inner_text("#error-text")
    page.click("#tab-img2img")
    page.fill("#steps", "4")
    page.click("#generate")
    assert "Choose, drop or paste a picture first" in page.inner_text("#error-text")


def test_batch_reload_keeps_results_and_send_to_inpaint(page, server):
    small_run(page, steps=6, seed=21, prompt="a blue square")
    page.fill("#batch_size", "2")
    generate(page)
    assert page.locator("#result img").count() == 2
    page.click("#result img >> nth=1")
    assert "Seed: 22" in page.inner_text("#infotext")  # picture i of a batch has seed + i
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "22"
    page.click("#result img >> nth=0")
    job = page.get_attribute("#result", "data-job")
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.input_value("#prompt") == "a blue square"  # the form comes back from local storage
    assert page.get_attribute("#result", "data-job") == job  # the last result from the server's job store
    assert page.locator("#gallery .thumb").count() >= 2
    assert "Seed: 21" in page.inner_text("#infotext")
    page.click("#gallery .thumb >> nth=0")
    page.click("#send-inpaint")
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    assert page.get_attribute("body", "data-mode") == "inpaint"
    assert page.eval_on_selector("#picture", "c => [c.width, c.height]") == [64, 64]


def test_phone_layout(browser, server):
    context, page, errors = open_page(browser, server, PHONE)
    try:
        controls = page.locator(".controls").bounding_box()
        output = page.locator(".output").bounding_box()
        assert output["y"] >= controls["y"] + controls["height"] - 1  # one column: output below the form
        assert controls["width"] <= PHONE["width"] and output["width"] <= PHONE["width"]
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"the page scrolls sideways ({width}px wide)"
        shot(page, "phone.png", full_page=True)
    finally:
        context.close()
    assert not errors


def test_credentials_are_asked_for_when_the_server_wants_them(browser, tmp_path):
    from stablekit.demo import demo_model

    # a bearer token: browsers have no prompt of their own for it (for Basic auth they show theirs first)
    secured = Server(demo_model(), tmp_path, token="apiuser-token-123", env={"OMP_NUM_THREADS": "1"})
    context = browser.new_context(viewport=LAPTOP)
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(secured.url + "/")
        page.wait_for_selector("#login[open]")  # one dialog, though several calls were refused
        page.fill("#login-token", "apiuser-token-123")
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("body[data-ready='1']")
        assert page.is_hidden("#error")
        assert page.locator("#sampler_name option").count() > 3
    finally:
        context.close()
        secured.stop()


def test_extra_networks_panel_puts_tags_into_the_prompt(browser, tmp_path):
    """The server's LoRAs and embeddings are listed; a click inserts the tag or trigger word at the cursor."""
    import torch
    from safetensors.torch import save_file

    from stablekit.demo import demo_model

    loras, embeddings = tmp_path / "loras", tmp_path / "embeddings"
    loras.mkdir(), embeddings.mkdir()
    (loras / "shiny.safetensors").write_bytes(b"listed by name; read only when a prompt uses it")
    save_file({"emb_params": torch.randn(2, 64)}, str(embeddings / "sparkle.safetensors"))  # the demo's text width
    srv = Server(demo_model(), tmp_path, "--lora-dir", str(loras), "--embeddings-dir", str(embeddings),
                 env={"OMP_NUM_THREADS": "1"})
    try:
        context, page, errors = open_page(browser, srv)
        try:
            page.click("#networks summary")
            page.fill("#prompt", "a red circle")
            page.click("#network-list button.lora:has-text('shiny')")
            page.click("#network-list button.embedding:has-text('sparkle')")
            assert page.input_value("#prompt") == "a red circle <lora:shiny:1> sparkle"
            shot(page, "extra-networks.png")
        finally:
            context.close()
        assert not errors, f"JavaScript errors in the page: {errors}"
    finally:
        srv.stop()


def test_hires_fix_and_variation_seed_panels(page, server):
    small_run(page, steps=4, seed=11)
    page.click("#hires-options > summary")
    page.check("#enable_hr")
    upscalers = page.eval_on_selector_all("#hr_upscaler option", "os => os.map(o => o.value)")
    assert upscalers[:2] == ["Latent", "Latent (antialiased)"] and "Lanczos" in upscalers  # the server's lists
    page.select_option("#hr_upscaler", "Lanczos")
    page.fill("#hr_second_pass_steps", "2")
    page.click("#variation-options > summary")
    page.fill("#subseed", "5")
    page.fill("#subseed_strength", "0.25")
    generate(page)
    assert page.eval_on_selector("#result img", "img => img.complete && img.naturalWidth") == 128
    info = page.inner_text("#infotext")
    assert "Hires upscale: 2" in info and "Hires upscaler: Lanczos" in info and "Variation seed: 5" in info
    shot(page, "txt2img-hires.png")
    page.click("#tab-depth2img")  # the demo model is a base model: the page shows the server's refusal
    assert page.is_visible("#show-depth") and page.is_hidden("#hires-options")


def test_controlnet_panel_previews_the_map_and_sends_the_unit(browser, tmp_path):
    """A random ControlNet shaped for the demo model in --controlnet-dir: the panel lists it, previews the
    canny map of a chosen picture through /controlnet/detect, and the run's infotext names the unit."""
    from safetensors.torch import save_file

    from stablekit.demo import demo_model
    from stablekit.models.controlnet import ControlNet, ControlNetConfig
    from stablekit.train.demo import DEMO_CONFIG

    from .conftest import randomize

    folder = tmp_path / "controlnet"
    folder.mkdir()
    net = ControlNet(ControlNetConfig(DEMO_CONFIG.unet))
    randomize(net, 5)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "control_demo_canny.safetensors"))
    square = Image.new("RGB", (64, 64), "black")
    square.paste((255, 255, 255), (16, 16, 48, 48))
    square.save(tmp_path / "square.png")
    srv = Server(demo_model(), tmp_path, "--controlnet-dir", str(folder), env={"OMP_NUM_THREADS": "1"})
    try:
        context, page, errors = open_page(browser, srv)
        try:
            page.click("#controlnet-options > summary")
            assert page.eval_on_selector_all("#cn_model option", "os => os.map(o => o.value)")[0].startswith(
                "control_demo_canny [")
            page.check("#cn_enabled")
            page.select_option("#cn_module", "canny")
            page.set_input_files("#cn_picture", str(tmp_path / "square.png"))
            page.wait_for_selector("#cn_source:not([hidden])")
            page.click("#cn_preview")
            page.wait_for_selector("#cn_map:not([hidden])")
            small_run(page, steps=3, seed=4)
            page.fill("#cn_weight", "0.8")
            generate(page)
            info = page.inner_text("#infotext")
            assert 'ControlNet 0: "Module: canny, Model: control_demo_canny [' in info and "Weight: 0.8" in info
            shot(page, "controlnet-panel.png")
        finally:
            context.close()
        assert not errors, f"JavaScript errors in the page: {errors}"
    finally:
        srv.stop()
