"""ControlNet preprocessors: canny, the blur and Otsu's threshold against OpenCV (a test-only oracle),
properties of the others, fitting maps to the working size, the CLI, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from stablekit.cli import main
from stablekit.pipeline.control import ControlUnit, detect_map, pixel_perfect_resolution
from stablekit.pipeline.control_maps import PREPROCESSORS, find_preprocessor, fit_control_map, from_pil
from stablekit.pipeline.control_ops import canny, gaussian_blur, otsu_threshold, resize_with_pad

cv2 = pytest.importorskip("cv2")


def drawing(width: int, height: int, seed: int) -> np.ndarray:
    """Filled ellipses and white lines on a dark background: edges of every direction."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (20, 40, 60))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.ellipse([x, y, x + int(rng.integers(5, 40)), y + int(rng.integers(5, 40))],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw.line([tuple(int(v) for v in rng.integers(0, min(width, height), 2)) for _ in range(2)],
                  fill=(255, 255, 255), width=2)
    return np.asarray(image)


def pictures():
    rng = np.random.default_rng(0)
    yield "noise", rng.integers(0, 256, (33, 65, 3), dtype=np.uint8)
    yield "drawing", drawing(64, 48, 1)
    yield "drawing 128", drawing(128, 128, 2)
    blurred = cv2.GaussianBlur(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8).astype(np.float32), (0, 0), 2)
    yield "photo-like", blurred.clip(0, 255).astype(np.uint8)
    y, x = np.mgrid[0:50, 0:60]
    yield "gradient", np.stack([x * 4, y * 5, (x + y) * 2], -1).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("name, picture", list(pictures()))
@pytest.mark.parametrize("low, high", [(100, 200), (50, 100), (200, 60), (10, 30)])
def test_canny_equals_opencv_bit_for_bit(name, picture, low, high):
    for image in (picture, np.ascontiguousarray(picture[:, :, 1])):  # colour and grey
        ours, ref = canny(image, low, high), cv2.Canny(image, low, high)
        assert np.array_equal(ours, ref), f"{name} {image.shape} {low}/{high}: {(ours != ref).sum()} pixels differ"
    if name.startswith(("noise", "drawing")) or low < 50:
        assert ref.max() == 255  # the pictures have edges to find


@pytest.mark.parametrize("sigma", [0.5, 5.0, 6.0, 9.0])
def test_gaussian_blur_matches_opencv(sigma):
    x = np.random.default_rng(3).random((40, 50, 3)).astype(np.float32) * 255
    assert np.abs(gaussian_blur(x, sigma) - cv2.GaussianBlur(x, (0, 0), sigma)).max() < 1e-3


def test_otsu_matches_opencv():
    rng = np.random.default_rng(4)
    for k in range(8):
        grey = rng.normal(90 + 12 * k, 20 + 6 * k, (50, 60)).clip(0, 255).astype(np.uint8)
        value, ref = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        ours_value, ours = otsu_threshold(grey)
        assert ours_value == value and np.array_equal(ours, ref)


@pytest.mark.parametrize("shape, resolution", [((48, 64), 512), ((512, 768), 512), ((300, 200), 256)])
def test_resize_with_pad_sizes_and_pixels(shape, resolution):
    picture = drawing(shape[1], shape[0], 5)
    padded, remove_pad = resize_with_pad(picture, resolution)
    k = resolution / min(shape)
    th, tw = int(np.round(shape[0] * k)), int(np.round(shape[1] * k))
    assert padded.shape[0] % 64 == 0 and padded.shape[1] % 64 == 0
    assert remove_pad(padded).shape[:2] == (th, tw)
    ref = cv2.resize(picture, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    gap = np.abs(remove_pad(padded).astype(int) - ref.astype(int)).max()
    assert gap == 0 if k <= 1 else gap <= 1  # area: OpenCV's exactly; cubic: within 1 of cv2 (built with IPP)


@pytest.mark.parametrize("size", [(30, 20), (17, 13), (200, 150), (40, 90)])
def test_resize_methods_match_opencv(size):
    from stablekit.pipeline.control_ops import resize

    picture = np.random.default_rng(11).integers(0, 256, (60, 80, 3), dtype=np.uint8)  # sharp: the hard case
    w, h = size
    flags = {"nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC}
    for method, flag in flags.items():
        if method == "area" and (w > 80 or h > 60):
            continue  # OpenCV's area on a growing side is another algorithm (ours: Pillow's box)
        gap = np.abs(resize(picture, w, h, method).astype(int) - cv2.resize(picture, (w, h), interpolation=flag)).max()
        assert gap <= (1 if method == "cubic" else 0), f"{method} to {w}x{h}: {gap} levels"


def test_invert_none_and_lineart():
    picture = np.full((64, 64, 3), 255, np.uint8)
    picture[30:34, :] = 0  # a black line on white
    run = lambda name: PREPROCESSORS[name].function(picture, 64, 0, 0)  # noqa: E731
    assert np.array_equal(run("none"), picture)
    assert np.array_equal(255 - run("invert"), picture)
    lines = run("lineart_standard")
    assert lines[30:34].mean() > 100 and lines[:20].max() == 0 and lines[-20:].max() == 0


def test_scribble_is_black_and_white_and_follows_the_lines():
    picture = drawing(64, 64, 6)
    out = PREPROCESSORS["scribble_xdog"].function(picture, 64, 32, 0)
    assert set(np.unique(out)) <= {0, 255} and out.max() == 255 and out.min() == 0


@pytest.mark.parametrize("mode", ["just-resize", "crop", "fill"])
def test_fit_control_map_sizes(mode):
    detected = drawing(80, 40, 7)
    out = fit_control_map(detected, 96, 64, mode)
    assert out.shape == (64, 96, 3)
    if mode == "fill":  # fitted inside: bands of the border's median colour above and below
        border = np.concatenate([detected[0], detected[-1], detected[:, 0], detected[:, -1]])
        assert np.array_equal(out[0, 0], np.median(border, axis=0).astype(np.uint8))


def test_binary_maps_stay_binary_when_resized():
    edges = np.repeat(canny(drawing(64, 64, 8), 100, 200)[:, :, None], 3, axis=2)
    out = fit_control_map(edges, 96, 96, "just-resize")
    assert set(np.unique(out)) <= {0, 255}


def test_pixel_perfect_resolution():
    picture = np.zeros((300, 400, 3), np.uint8)
    assert pixel_perfect_resolution(picture, 512, 512, "crop") == 512  # covers: the short side becomes 512
    assert pixel_perfect_resolution(picture, 512, 512, "fill") == 384  # fits inside: the long side becomes 512


def test_rgba_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert from_pil(rgba).min() == 255


@pytest.mark.parametrize("unit, message", [
    (ControlUnit("-", module="canny", threshold_a=300), r"threshold A \(Low Threshold\) must be in 1..255"),
    (ControlUnit("-", module="canny", processor_res=16), "processor resolution must be in 64..2048"),
    (ControlUnit("-", module="depth_midas"), "needs a depth estimator"),
])
def test_bad_preprocessor_settings(unit, message):
    with pytest.raises(ValueError, match=message):
        detect_map(unit, Image.new("RGB", (64, 64)), 64, 64)


def test_unknown_preprocessor_names_the_choices():
    with pytest.raises(ValueError, match="unknown preprocessor 'sobel'; choose from none, canny"):
        find_preprocessor("sobel")
    assert find_preprocessor("depth").name == "depth_midas"  # an older name
    with pytest.raises(ValueError):
        find_preprocessor("lineart")  # the extension's model-based lineart_realistic: not here


def test_cli_preprocess_writes_the_map(tmp_path, capsys):
    source = tmp_path / "in.png"
    Image.fromarray(drawing(64, 64, 9)).save(source)
    assert main(["preprocess", "canny", str(source), "--res", "64", "--out", str(tmp_path / "maps")]) == 0
    written = Image.open(capsys.readouterr().out.strip())
    assert np.array_equal(np.asarray(written)[:, :, 0], cv2.Canny(drawing(64, 64, 9), 100, 200))
    assert main(["preprocess", "sobel", str(source)]) == 2
    assert "unknown preprocessor" in capsys.readouterr().err


def test_depth_midas_runs_the_checkpoints_estimator(tmp_path, capsys):
    """The CLI's depth_midas map from a depth checkpoint's own DPT: grey, min-max scaled to 0..255 (over the padded picture), at the
    processor resolution (the picture's short side -> 64, padded to 64s while the network runs)."""
    from .test_depth2img import make_depth_model

    checkpoint = make_depth_model(tmp_path)[0]
    source = tmp_path / "in.png"
    Image.fromarray(drawing(96, 64, 10)).save(source)
    assert main(["preprocess", "depth_midas", str(source), "--model", str(checkpoint), "--res", "64",
                 "--out", str(tmp_path / "maps")]) == 0
    depth = np.asarray(Image.open(capsys.readouterr().out.strip()))
    assert depth.shape == (64, 96, 3) and np.array_equal(depth[:, :, 0], depth[:, :, 1])
    assert depth.max() > depth.min()  # scaled over the padded picture, as the extension does
