"""Before/after picture pairs for img2img, both inpainting methods, outpainting, depth2img (with its
depth map), the x4 upscaler and ControlNet (its canny map, and where the control changes the result),
made with the tiny random-weight test models (so the "after" shows where things changed, not a
meaningful picture), and hires fix and variation seeds with the demo model.

    python scripts/editing_examples.py docs/examples
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import ldm_state_dict, ldm_yaml, low_scale_buffers, tiny_config, tiny_upscaler_config  # noqa: E402
from tests.test_depth2img import make_depth_model  # noqa: E402
from tests.test_img2img import make_picture  # noqa: E402
from tests.test_inpaint import make_mask  # noqa: E402

import stablekit  # noqa: E402


def tiny_model(family: str, folder: Path) -> Path:
    cfg = tiny_config(family)
    path = folder / f"tiny-{family}.safetensors"
    save_file(ldm_state_dict(cfg, seed=100), str(path))
    path.with_suffix(".yaml").write_text(yaml.safe_dump(ldm_yaml(cfg)))
    return path


def side_by_side(before: Image.Image, after: Image.Image) -> Image.Image:
    out = Image.new("RGB", (before.width + after.width + 4, max(before.height, after.height)), "white")
    out.paste(before, (0, 0))
    out.paste(after, (before.width + 4, 0))
    return out.resize((out.width * 3, out.height * 3), Image.NEAREST)


def tiny_upscaler(folder: Path) -> Path:
    cfg = tiny_upscaler_config()
    path = folder / "tiny-x4-upscaler.safetensors"
    save_file({**ldm_state_dict(cfg, seed=200), **low_scale_buffers(cfg.lowres)}, str(path))
    return path


def tiny_controlnet(folder: Path, base: stablekit.Engine) -> Path:
    """A random ControlNet shaped for the tiny SD 1 model, in the original layout."""
    from stablekit.models.controlnet import ControlNet, ControlNetConfig
    from tests.conftest import randomize

    net = ControlNet(ControlNetConfig(base.config.unet, hint_block_channels=(8, 8, 16, 16)))
    randomize(net, 7)
    path = folder / "control_tiny_canny.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def controlnet_pairs(base: stablekit.Engine, tmp: Path, common: dict) -> dict:
    """The canny map of a square, and |with - without| the control (amplified): where it acts."""
    from stablekit.pipeline.control import ControlUnit

    square = Image.new("RGB", (96, 64), "black")
    square.paste((255, 255, 255), (28, 12, 68, 52))
    unit = ControlUnit(str(tiny_controlnet(tmp, base)), image=square, module="canny", processor_res=64,
                       resize="just-resize")
    edges = Image.fromarray(base.control_map(unit, square, 96, 64))
    without = base.txt2img(**common)[0]
    with_control = base.txt2img(**common, controls=(unit,))[0]
    change = np.abs(np.asarray(with_control, np.int16) - np.asarray(without, np.int16)).max(axis=2)
    where = Image.fromarray(np.clip(change * 4, 0, 255).astype(np.uint8)).convert("RGB")
    return {"controlnet-canny-map": (square, edges), "controlnet": (without, with_control),
            "controlnet-change": (edges, where)}


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # kept while the depth model's estimator is read from its file
        examples(out_dir, Path(tmp))


def examples(out_dir: Path, tmp: Path) -> None:
    from stablekit.demo import demo_model
    from stablekit.pipeline.depth import depth_picture

    base = stablekit.load(tiny_model("sd1", tmp))
    inpaint_model = stablekit.load(tiny_model("sd1-inpaint", tmp))
    depth_model = stablekit.load(make_depth_model(tmp)[0])
    upscaler = stablekit.load(tiny_upscaler(tmp))
    demo = stablekit.load(demo_model())
    picture, mask = make_picture(), make_mask()
    common = dict(prompt="a yellow star", width=96, height=64, steps=12, seed=1, sampler="Euler a")
    pairs = {
        "img2img": (picture, base.img2img(picture, denoising_strength=0.5, **common)[0]),
        "inpaint-blend": (picture, base.inpaint(picture, mask, denoising_strength=1.0, **common)[0]),
        "inpaint-model": (picture, inpaint_model.inpaint(picture, mask, denoising_strength=1.0, **common)[0]),
        "outpaint": (make_picture(64, 64), base.outpaint(make_picture(64, 64), right=32, prompt="a yellow star",
                                                         steps=12, seed=1, sampler="Euler a")[0]),
    }
    pairs.update(controlnet_pairs(base, tmp, common))
    square = make_picture(64, 48)
    depth16 = np.asarray(depth_picture(depth_model.estimate_depth(square)[0]), dtype=np.float64)
    depth = Image.fromarray((depth16 / 257).astype(np.uint8)).resize(square.size, Image.BICUBIC)  # 8-bit view
    shapes = dict(prompt="a red circle and a blue square", steps=20, seed=3, sampler="Euler a")
    first = demo.txt2img(**shapes)[0]
    pairs.update({
        "depth2img-depth-map": (square, depth.convert("RGB")),
        "depth2img": (square, depth_model.depth2img(square, prompt="a yellow star", steps=12, seed=1)[0]),
        "upscale-x4": (make_picture(24, 16), upscaler.upscale(make_picture(24, 16), prompt="sharp", steps=12, seed=1)[0]),
        "hires-fix-demo": (first.resize((128, 128), Image.NEAREST),
                           demo.txt2img(**shapes, hires_scale=2, hires_steps=10, hires_denoise=0.5)[0]),
        "variation-seed-demo": (first, demo.txt2img(**shapes, subseed=9, subseed_strength=0.3)[0]),
    })
    for name, (before, after) in pairs.items():
        path = out_dir / f"{name}.png"
        side_by_side(before, after).save(path)
        print(path)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/examples"))
