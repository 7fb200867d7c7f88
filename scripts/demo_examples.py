"""Pictures of the shipped demo model: a txt2img grid, and img2img / inpainting / outpainting before-after.

    python scripts/demo_examples.py docs/examples

Every picture is scaled up 4x (nearest neighbour) so the 64x64 originals can be seen.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

import stablekit
from stablekit.demo import demo_model
from stablekit.demo.shapes import Scene, Shape, render

PROMPTS = [
    "a red circle on a blue background",
    "a yellow star on a black background",
    "a small green square in the top left corner, white background",
    "a purple triangle on a yellow background",
    "a large pink ring at the right, green background",
    "a blue ring and an orange diamond on a grey background",
]
ZOOM = 4


def row(pictures: list[Image.Image], gap: int = 2) -> Image.Image:
    w, h = pictures[0].size
    out = Image.new("RGB", (len(pictures) * (w + gap) - gap, h), "white")
    for i, p in enumerate(pictures):
        out.paste(p, (i * (w + gap), 0))
    return out.resize((out.width * ZOOM, out.height * ZOOM), Image.NEAREST)


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    engine = stablekit.load(demo_model())
    rows = [row(engine.txt2img(prompt=p, seed=1, batch_size=6)) for p in PROMPTS]
    grid = Image.new("RGB", (rows[0].width, sum(r.height + 8 for r in rows)), "white")
    for i, r in enumerate(rows):
        grid.paste(r, (0, i * (r.height + 8)))
    grid.save(out_dir / "demo-txt2img.png")

    picture = render(Scene("white", (Shape("blue", "circle", "medium", "left"),)))
    (img2img,) = engine.img2img(picture, prompt="a red circle on a white background", seed=1,
                                denoising_strength=0.6)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (34, 16, 62, 48))
    (inpainted,) = engine.inpaint(picture, mask, prompt="a blue circle and a green square on a white background",
                                  seed=1, mask_blur=2)
    shown_mask = picture.copy()
    ImageDraw.Draw(shown_mask).rectangle((34, 16, 61, 47), outline=(255, 0, 0))
    (outpainted,) = engine.outpaint(picture, right=32, prompt="a blue circle and a yellow star on a white background",
                                    seed=1)
    row([picture, img2img]).save(out_dir / "demo-img2img.png")
    row([shown_mask, inpainted]).save(out_dir / "demo-inpaint.png")
    canvas = Image.new("RGB", outpainted.size, "white")
    canvas.paste(picture, (0, 0))
    row([canvas, outpainted]).save(out_dir / "demo-outpaint.png")
    for name in ("txt2img", "img2img", "inpaint", "outpaint"):
        print(out_dir / f"demo-{name}.png")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/examples"))
