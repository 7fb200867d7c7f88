"""stablekit: Stable Diffusion 1.x / 2.x checkpoints in, pictures out."""

import os

__version__ = "0.1.0"

# Before torch loads its OpenMP runtime: threads that wait sleep instead of spinning. Spinning threads
# fight whatever else runs on the machine; with both cores busy elsewhere a 64x64 demo picture took 7.9 s
# instead of 1.9 s (and 1.9 s instead of 0.8 s on an idle machine). A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .engine import Engine, load  # noqa: E402
from .params import GenerationParams  # noqa: E402

__all__ = ["Engine", "GenerationParams", "load", "__version__"]
