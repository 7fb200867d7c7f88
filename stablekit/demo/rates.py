"""How well a shapes model follows its prompts: colour, shape and place rates over fixed seeds.

    python -m stablekit.demo.rates [--model shapes-demo] [--seeds 20] [--steps 20]

Colour: "a C S on a B background" for colour pairs seen in training (background and shape colour
both right). Shape and place: prompts whose colour pair never appeared in training
(shapes.HELD_OUT_PAIRS), one prompt per shape kind and per place word; a picture counts when the
analyser (`analyse.describe`) reads the asked shape, or the asked place (the nearest of the nine).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from .analyse import describe
from .shapes import HELD_OUT_PAIRS, SHAPES

SEEN = [("red", "circle", "blue"), ("yellow", "star", "black"), ("green", "square", "white"),
        ("purple", "triangle", "yellow"), ("orange", "ring", "grey"), ("cyan", "diamond", "brown")]
PLACE_WORDS = {"left": "at the left", "right": "at the right", "top": "at the top", "bottom": "at the bottom",
               "center": "in the center"}


@dataclass(frozen=True)
class Rates:
    colour: float
    shape: float
    place: float
    per_shape: dict[str, float]
    per_place: dict[str, float]


def read_prompt(engine, prompt: str, seeds: int, seed: int, steps: int = 20) -> list:
    """The analyser's descriptions of `seeds` pictures of `prompt` (seeds seed, seed + 1, ...)."""
    return [describe(im) for im in engine.txt2img(prompt=prompt, seed=seed, batch_size=seeds, steps=steps)]


def seen_colour_rate(engine, seeds: int, seed: int, steps: int = 20, tag: str = "") -> float:
    """Share of pictures of the SEEN prompts (with `tag` appended) whose two colours are right."""
    hits = [d.background == bg and d.foreground == c for c, s, bg in SEEN
            for d in read_prompt(engine, f"a {c} {s} on a {bg} background{tag}", seeds, seed, steps)]
    return sum(hits) / len(hits)


def measure(engine, seeds: int = 20, steps: int = 20, seed: int = 1000) -> Rates:
    """The three rates of `engine` (a loaded shapes model) over `seeds` pictures per prompt."""
    def pictures(prompt: str):
        return read_prompt(engine, prompt, seeds, seed, steps)

    pairs = sorted(HELD_OUT_PAIRS)
    per_shape = {}
    for i, kind in enumerate(SHAPES):
        c, bg = pairs[i % len(pairs)]
        found = pictures(f"a {c} {kind} on a {bg} background")
        per_shape[kind] = sum(d.shape == kind for d in found) / seeds
    per_place = {}
    for i, (place, words) in enumerate(PLACE_WORDS.items()):
        c, bg = pairs[(i + 3) % len(pairs)]
        found = pictures(f"a {c} {SHAPES[i % len(SHAPES)]} {words}, {bg} background")
        per_place[place] = sum(d.place == place for d in found) / seeds
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return Rates(seen_colour_rate(engine, seeds, seed, steps), mean(per_shape.values()), mean(per_place.values()),
                 per_shape, per_place)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stablekit.demo.rates", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-demo")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    import stablekit

    rates = measure(stablekit.load(args.model), args.seeds, args.steps)
    print(f"colour (seen pairs) {rates.colour:.0%}, shape {rates.shape:.0%}, place {rates.place:.0%}")
    print("shape: " + ", ".join(f"{k} {v:.0%}" for k, v in rates.per_shape.items()))
    print("place: " + ", ".join(f"{k} {v:.0%}" for k, v in rates.per_place.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
