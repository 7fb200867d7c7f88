"""Building modules without memory and without initialising weights that a checkpoint replaces."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode


class _SkipInit(TorchFunctionMode):
    """`torch.nn.init.*` calls return their tensor untouched. On the meta device they would do no
    work anyway, but their reference implementations import torch's compiler stack on first use:
    0.8 s of every first model load, for random numbers nobody keeps."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))


@contextmanager
def empty_modules() -> Iterator[None]:
    """Modules built inside have meta tensors of the right shapes and no values: for load_state_dict(assign=True)."""
    with torch.device("meta"), _SkipInit():
        yield
