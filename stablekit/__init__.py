"""stablekit: Stable Diffusion 1.x / 2.x checkpoints in, pictures out."""

__version__ = "0.1.0"


from .engine import Engine, load
from .params import GenerationParams
from .pipeline.control import ControlUnit

__all__ = ["ControlUnit", "Engine", "GenerationParams", "load", "__version__"]
