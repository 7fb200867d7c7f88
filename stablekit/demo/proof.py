"""Teaching the shapes demo model a new word, measured: "zorp" = an orange ring.

    python -m stablekit.demo.proof [--out runs/zorp] [--steps 300] [--seeds 20]

Eight drawn orange rings on grey, captioned "a zorp on a grey background", train a LoRA
(`train lora`) and a DreamBooth LoRA with prior preservation (class prompt "a ring on a grey
background", class pictures made by the model). Before and after, 20 seeds of "a zorp on a grey
background" are read by the analyser: the share of pictures with an orange foreground and of those
read as a ring; and the colour rate of the prompts seen in training (`rates.SEEN`) shows what the
training did to the rest. The LoRA is then used as a `<lora:zorp:1>` tag through `--lora-dir`, the
path the web-UI API takes.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from .rates import read_prompt, seen_colour_rate
from .shapes import Scene, Shape, render

WORD_PROMPT = "a zorp on a grey background"
CLASS_PROMPT = "a ring on a grey background"


def write_instances(folder: Path, count: int = 8, seed: int = 0) -> Path:
    """Orange rings on grey (sizes and places vary), each with the word's caption."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        shape = Shape("orange", "ring", rng.choice(["medium", "large"]), rng.choice(["center", "left", "right"]),
                      (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)))
        render(Scene("grey", (shape,))).save(folder / f"zorp-{i}.png")
        (folder / f"zorp-{i}.txt").write_text(WORD_PROMPT)
    return folder


@dataclass(frozen=True)
class WordRates:
    orange: float  # pictures of the word's prompt with an orange foreground
    ring: float  # ... read as a ring
    seen_colours: float  # colour adherence on the prompts seen in training


def word_rates(engine, seeds: int = 20, tag: str = "", seed: int = 2000) -> WordRates:
    """The rates of `engine`, with `tag` (a <lora:...> tag) added to every prompt."""
    found = read_prompt(engine, WORD_PROMPT + tag, seeds, seed)
    return WordRates(sum(d.foreground == "orange" for d in found) / seeds,
                     sum(d.foreground == "orange" and d.shape == "ring" for d in found) / seeds,
                     seen_colour_rate(engine, seeds, seed, tag=tag))


def picture_rows(engine, tags: list[str], columns: int = 8, seed: int = 2000):
    """One row per tag of the word's pictures (the first `columns` seeds of the rates), as one picture."""
    from PIL import Image

    rows = [engine.txt2img(prompt=WORD_PROMPT + tag, seed=seed, batch_size=columns) for tag in tags]
    w, h = rows[0][0].size
    sheet = Image.new("RGB", (columns * w, len(rows) * h))
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            sheet.paste(picture, (c * w, r * h))
    return sheet


def prove(out: Path, steps: int = 300, seeds: int = 20, num_class_images: int = 16,
          pictures: Path | None = None) -> dict[str, WordRates]:
    """Rates before training, with the trained LoRA, and with the DreamBooth LoRA (as <lora:...> tags);
    `pictures`: also save the rows before / LoRA / DreamBooth there (PNG)."""
    import stablekit

    from ..train.dreambooth import train_dreambooth
    from ..train.lora import train_lora
    from . import demo_model

    data = write_instances(out / "instances")
    loras = out / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    common = dict(steps=steps, batch_size=4, lr=1e-3, rank=8, size=64, device="cpu")
    lora = train_lora(demo_model(), data, out / "lora-run", name="zorp", **common)
    dreambooth = train_dreambooth(demo_model(), data, WORD_PROMPT, out / "dreambooth-run", lora=True,
                                  class_prompt=CLASS_PROMPT, num_class_images=num_class_images, **common)
    for path, name in ((lora, "zorp"), (dreambooth, "zorp-db")):
        (loras / f"{name}.safetensors").write_bytes(path.read_bytes())
    engine = stablekit.load(demo_model(), lora_dir=loras)
    rates = {"before": word_rates(engine, seeds)}
    for name in ("zorp", "zorp-db"):
        rates[name] = word_rates(engine, seeds, f" <lora:{name}:1>")
    if pictures is not None:
        picture_rows(engine, ["", " <lora:zorp:1>", " <lora:zorp-db:1>"]).save(pictures)
    return rates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stablekit.demo.proof", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/zorp"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--pictures", type=Path, default=None,
                    help="a PNG of the word's pictures: before, with the LoRA, with the DreamBooth LoRA")
    args = ap.parse_args(argv)
    for name, r in prove(args.out, args.steps, args.seeds, pictures=args.pictures).items():
        print(f"{name:10} '{WORD_PROMPT}': orange {r.orange:.0%}, orange ring {r.ring:.0%}; "
              f"seen prompts' colours {r.seen_colours:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
