"""LoRA and LyCORIS (LoCon, LoHa, LoKr) files, merged into a loaded model's weights.

    lora = read_lora("style.safetensors")            # kohya / web UI, diffusers-PEFT, LyCORIS
    patcher = LoraPatcher(engine.loaded.model)
    patcher.apply([(lora, 0.8, 0.8)])                # (file, text-encoder weight, UNet weight), ...
    ...generate...
    patcher.restore()                                # base weights back, bit for bit

Why patch the weights instead of hooking the layers: a merged delta costs nothing per step. A
hook adds two small matmuls to every adapted layer (hundreds in SD) on every UNet call, breaks
fused attention paths and compiled graphs, and runs in the weights' low precision. Merging costs
one pass over the touched weights when the set of LoRAs or their weights changes, as in the web
UI (`network_apply_weights`), and the exact copies kept of the touched tensors make `restore`
bit-identical. The delta is computed in float32 and added before casting back, so fp16/bf16
models lose nothing to the factors' precision; several LoRAs on one weight are summed first.

Which parameter a file's module names, and the math, follow the web UI (see `lora_keys`,
`lora_math`); the file hash is the web UI's "Lora hashes" infotext hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from ..checkpoint import file_sha256, read_tensors
from ..checkpoint.files import safetensors_metadata, shown_keys
from ..config import ModelConfig
from ..detect import CheckpointError
from .lora_keys import KeyMap, Target
from .lora_math import SCALARS, SUFFIXES, AdapterModule, fit, pad_to

__all__ = ["AdapterModule", "LoraError", "LoraFile", "LoraPatcher", "addnet_hash", "infotext_hashes", "read_lora"]

_REQUIRED = {"lora": [("up",), ("down",)], "loha": [("w1a",), ("w1b",), ("w2a",), ("w2b",)],
             "lokr": [("w1", "w1a"), ("w2", "w2a")]}  # any one of each tuple; the a/b pairs are checked below
_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x"}


class LoraError(ValueError):
    """A LoRA file that cannot be read, or that does not fit the model, with a message for a person."""


@dataclass
class LoraFile:
    """A parsed LoRA / LyCORIS file: its modules by the names the file uses."""

    path: Path
    modules: dict[str, AdapterModule]
    metadata: dict[str, str] = field(default_factory=dict)
    _hash: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def alias(self) -> str:
        """The name the web UI also accepts in prompts: the training run's `ss_output_name`."""
        return self.metadata.get("ss_output_name") or self.name

    @property
    def kinds(self) -> list[str]:
        return sorted({m.kind for m in self.modules.values()})

    @property
    def hash(self) -> str:
        """The web UI's LoRA hash: metadata `sshs_model_hash`, else the addnet hash (safetensors), else sha256."""
        if self._hash is None:
            stored = self.metadata.get("sshs_model_hash", "")
            if re.fullmatch(r"[0-9a-fA-F]{12,64}", stored):  # metadata is unchecked text: only a hex digest counts
                self._hash = stored.lower()
            elif self.path.suffix == ".safetensors":
                self._hash = addnet_hash(self.path)
            else:
                self._hash = file_sha256(self.path)
        return self._hash

    @property
    def short_hash(self) -> str:
        """12 hex digits, as the web UI writes in `Lora hashes`."""
        return self.hash[:12]


def addnet_hash(path: Path) -> str:
    """sha256 of a safetensors file after its header (kohya / additional-networks "addnet" hash).

    Hashing only the tensor bytes keeps the hash when a tool rewrites the metadata.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def infotext_hashes(used: Iterable[tuple[str, LoraFile]]) -> str:
    """The value of the web UI's `Lora hashes` infotext field: `name: 0123456789ab, other: ...`.

    `name` is the one written in the prompt; the web UI removes `:` and `,` from it.
    """
    return ", ".join(f"{re.sub('[:,]', '', name)}: {lora.short_hash}" for name, lora in used)


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA / LyCORIS file (.safetensors, or a weights-only .pt / .ckpt) and group its tensors."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    try:
        tensors = read_tensors(path)
    except CheckpointError as e:
        raise LoraError(f"cannot read LoRA file {path}: {e}") from None
    metadata = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    return LoraFile(path, _modules(tensors, metadata, path.name), metadata)


def _split(key: str) -> tuple[str, str] | None:
    for suffix in sorted([*SUFFIXES, *SCALARS], key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def _peft_alphas(metadata: Mapping[str, str], filename: str) -> dict[str, float]:
    """diffusers' `lora_adapter_metadata`: the PEFT config per component ("unet", "text_encoder")."""
    raw = metadata.get("lora_adapter_metadata")
    config = json.loads(raw) if raw else {}
    alphas = {}
    for part in ("unet", "text_encoder"):
        if config.get(f"{part}.use_rslora") or config.get(f"{part}.alpha_pattern"):
            raise LoraError(f"{filename}: PEFT options use_rslora / alpha_pattern are not supported")
        if config.get(f"{part}.lora_alpha") is not None:
            alphas[part + "."] = float(config[f"{part}.lora_alpha"])
    return alphas


def _modules(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], filename: str) -> dict[str, AdapterModule]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key in tensors:
        split = _split(key)
        if split is None:
            unknown.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = tensors[key]
    if not any(s in SUFFIXES for g in groups.values() for s in g):
        looks_like = " It looks like a full model checkpoint." if any(
            k.startswith("model.diffusion_model.") for k in tensors) else ""
        raise LoraError(f"{filename} is not a LoRA or LyCORIS file: none of its {len(tensors)} keys is a LoRA, LoHa "
                        f"or LoKr factor (such as *.lora_down.weight, *.lora_A.weight, *.hada_w1_a, *.lokr_w1).{looks_like}")
    if unknown:
        dora = " (DoRA files, with dora_scale, are not supported)" if any("dora_scale" in k for k in unknown) else ""
        raise LoraError(f"{filename}: {len(unknown)} keys are not LoRA / LyCORIS tensors{dora}: {shown_keys(unknown)}")
    peft_alphas = _peft_alphas(metadata, filename)
    modules, broken = {}, []
    for name, group in groups.items():
        kinds = {SUFFIXES[s][0] for s in group if s in SUFFIXES}
        factors = {SUFFIXES[s][1]: t for s, t in group.items() if s in SUFFIXES}
        if len(kinds) != 1:
            broken.append(f"{name} ({'mixes ' + ' and '.join(sorted(kinds)) if kinds else 'no factors'})")
            continue
        kind = kinds.pop()
        missing = [" or ".join(alt) for alt in _REQUIRED[kind] if not any(a in factors for a in alt)]
        missing += [f"{p}b" for p in ("w1", "w2") if kind == "lokr" and f"{p}a" in factors and f"{p}b" not in factors]
        if missing:
            broken.append(f"{name} (no {', '.join(missing)})")
            continue
        alpha = float(group["alpha"].item()) if "alpha" in group else next(
            (a for prefix, a in peft_alphas.items() if name.startswith(prefix)), None)
        scale = float(group["scale"].item()) if "scale" in group else None
        modules[name] = AdapterModule(name, kind, factors, alpha, scale)
    if broken:
        raise LoraError(f"{filename}: incomplete modules: {shown_keys(broken)}")
    return modules


# --- fitting a file to a model ----------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    module: AdapterModule
    target: Target
    view: tuple[int, ...]  # the shape the delta is viewed in before it is added


def _family(width: int) -> str:
    return f" ({_FAMILIES[width]})" if width in _FAMILIES else ""


def _width_hint(name: str, shape: torch.Size, cfg: ModelConfig) -> str:
    """Why shapes differ, when the input width tells another model family (768 SD 1, 1024 SD 2)."""
    if len(shape) < 2:
        return ""
    if re.search(r"(self_attn|attn)[._]?(q|k|v|out)_proj|mlp[._]fc1|c_fc", name) and shape[1] != cfg.text.width:
        what, theirs, ours = "text encoder", shape[1], cfg.text.width
    elif re.search(r"attn2[._]to_[kv]$", name) and shape[1] != cfg.unet.context_dim:
        what, theirs, ours = "cross-attention context", shape[1], cfg.unet.context_dim
    else:
        return ""
    return (f" The LoRA's {what} is {theirs} wide{_family(theirs)}, this model's {ours}{_family(ours)}: "
            "the LoRA was made for another model family.")


def resolve(lora: LoraFile, keys: KeyMap, shapes: Mapping[str, torch.Size]) -> list[Patch]:
    """Every module of `lora` with the parameter it changes; a `LoraError` naming all that do not fit."""
    unknown, wrong, patches, hint = [], [], [], ""
    for name, module in lora.modules.items():
        target = keys.target(name)
        if target is None:
            unknown.append(name)
            continue
        shape = shapes[target.param]
        if target.rows:
            shape = torch.Size((target.rows[1] - target.rows[0], *shape[1:]))
        delta = module.delta_shape()
        view = fit(delta, shape)
        if view is None:
            wrong.append(f"{name}: LoRA {tuple(delta)} vs model {tuple(shape)}")
            hint = hint or _width_hint(name, delta, keys.cfg)
        else:
            patches.append(Patch(module, target, view))
    if not unknown and not wrong:
        return patches
    problems = [f"{len(unknown)} modules match nothing in the model: {shown_keys(unknown)}"] if unknown else []
    problems += [f"{len(wrong)} have other shapes: {shown_keys(wrong, 3)}"] if wrong else []
    if any(n.startswith(("lora_te2_", "text_encoder_2.")) for n in lora.modules):
        hint += " It has a second text encoder: it is an SDXL LoRA, and stablekit runs SD 1.x and 2.x."
    elif any("resblocks" in n for n in unknown) and keys.cfg.text.layout == "clip":
        hint += " Its text-encoder names are OpenCLIP ones (SD 2.x); this model has an SD 1.x text encoder."
    raise LoraError(f"LoRA {lora.path.name} does not fit this {keys.cfg.name} model: " + "; ".join(problems) + hint)


class LoraPatcher:
    """Merges LoRAs into one model's weights in place, and puts the exact original tensors back."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._keys = KeyMap(model)
        self._backup: dict[str, torch.Tensor] = {}  # param key -> exact copy of the base weight (CPU)
        self._applied: tuple[tuple[LoraFile, float, float], ...] = ()

    @property
    def applied(self) -> tuple[tuple[LoraFile, float, float], ...]:
        return self._applied

    def check(self, lora: LoraFile) -> None:
        """Raise the `LoraError` that applying `lora` would raise, without touching a weight."""
        resolve(lora, self._keys, {k: p.shape for k, p in self.model.named_parameters()})

    def apply(self, loras: Iterable[tuple[LoraFile, float, float]]) -> None:
        """Make the weights base + sum of te_weight / unet_weight * delta over `loras` (replacing any before).

        Every file is checked against the model before any weight changes, so a bad file leaves the
        model as it was. Applying the same list again does nothing.
        """
        wanted = tuple((lora, float(te), float(unet)) for lora, te, unet in loras)
        if len(wanted) == len(self._applied) and all(
                a[0] is b[0] and a[1:] == b[1:] for a, b in zip(wanted, self._applied)):
            return
        params = dict(self.model.named_parameters())
        shapes = {k: p.shape for k, p in params.items()}
        plan: dict[str, list[tuple[Patch, float]]] = {}
        for lora, te, unet in wanted:
            for patch in resolve(lora, self._keys, shapes):
                weight = te if patch.module.part == "te" else unet
                if weight:
                    plan.setdefault(patch.target.param, []).append((patch, weight))
        self.restore()
        try:
            with torch.no_grad():
                for key, patches in plan.items():
                    self._add(key, params[key], patches)
        except BaseException:  # e.g. out of memory half-way: no half-patched model
            self.restore()
            raise
        self._applied = wanted

    def _add(self, key: str, param: torch.Tensor, patches: list[tuple[Patch, float]]) -> None:
        total = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        for patch, weight in patches:
            rows = patch.target.rows
            dest = total[rows[0]:rows[1]] if rows else total  # a view: SD 2's q, k or v third
            delta = patch.module.delta(param.device).reshape(patch.view)
            dest.add_(pad_to(delta, dest.shape), alpha=weight)
        self._backup[key] = param.detach().to("cpu", copy=True)
        param.copy_(param.float() + total)  # float32 sum, one rounding back to the weight's dtype

    def restore(self) -> None:
        """Put back the base weights exactly as they were before `apply`."""
        if self._backup:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for key, original in self._backup.items():
                    params[key].copy_(original)
            self._backup.clear()
        self._applied = ()

    def __enter__(self) -> LoraPatcher:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
