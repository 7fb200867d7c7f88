"""The shapes demo model: a small Stable Diffusion trained here on procedural pictures, shipped in the package.

It is the default model when none is named, so a fresh install makes pictures offline.
`recipe.py` trains it, `shapes.py` is its data, `analyse.py` reads its pictures back.
"""

from __future__ import annotations

from pathlib import Path

from ..detect import CheckpointError

WEIGHTS = Path(__file__).resolve().parent / "weights" / "shapes-demo.safetensors"


def demo_model() -> Path:
    """Path of the shipped demo checkpoint (its `.yaml` sits beside it)."""
    if not WEIGHTS.is_file():
        raise CheckpointError(f"the demo model is missing from this installation ({WEIGHTS.name}); "
                              "reinstall stablekit, or train it with `stablekit train demo`")
    return WEIGHTS
