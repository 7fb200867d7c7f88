"""The only package that reads model files.

Accepted: an original single-file checkpoint (`.safetensors`, memory-mapped; `.ckpt`/`.pt`
through `torch.load(weights_only=True)` only, so a pickle that would run code is refused
without running it), a diffusers-format folder (converted once to the original key layout),
or a Hugging Face repo id (downloaded with huggingface_hub). Every path ends in the same
place: an LDM-layout state dict -> `detect()` -> modules built on the meta device -> a strict
load straight into the target dtype.
"""

from .files import read_tensors, shapes_of
from .load import LoadedModel, OpenedCheckpoint, build_and_load, cache_dir, file_sha256, load_model, open_checkpoint
from .sources import SINGLE_FILE_SUFFIXES, resolve
from ..detect import CheckpointError

__all__ = [
    "CheckpointError", "LoadedModel", "OpenedCheckpoint", "SINGLE_FILE_SUFFIXES", "build_and_load", "cache_dir",
    "file_sha256", "load_model", "open_checkpoint", "read_tensors", "resolve", "shapes_of",
]
