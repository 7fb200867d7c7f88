"""stablekit: Stable Diffusion 1.x / 2.x checkpoints in, pictures out."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public names are imported when first used, so `import stablekit` (and the command line's
# help and argument checks) does not load torch.
_PUBLIC = {"Engine": ".engine", "load": ".engine", "GenerationParams": ".params", "ControlUnit": ".pipeline.control"}

if TYPE_CHECKING:
    from .engine import Engine, load
    from .params import GenerationParams
    from .pipeline.control import ControlUnit


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module 'stablekit' has no attribute {name!r}")


__all__ = ["ControlUnit", "Engine", "GenerationParams", "load", "__version__"]
