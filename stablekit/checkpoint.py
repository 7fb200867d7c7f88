"""The only module that reads model files.

Accepted: an original single-file checkpoint (`.safetensors`, memory-mapped; `.ckpt`/`.pt`
through `torch.load(weights_only=True)` only, so a pickle that would run code is refused
without running it), a diffusers-format folder (converted once to the original key layout),
or a Hugging Face repo id (downloaded with huggingface_hub). Every path ends in the same
place: an LDM-layout state dict -> `detect()` -> modules built on the meta device -> a strict
load straight into the target dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

import torch

from .config import ModelConfig, Prediction, ScheduleConfig
from .detect import CheckpointError, Hints, detect, unused_keys
from .diffusers_keys import Recipe, clip_to_ldm, openclip_to_ldm, unet_to_ldm, vae_to_ldm
from .models import StableDiffusionModel

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass
class LoadedModel:
    model: StableDiffusionModel
    config: ModelConfig
    name: str  # shown in infotext as "Model"
    path: Path | None  # the file or folder the weights came from
    notes: list[str] = field(default_factory=list)  # how detection decided, for the user
    _hash: str | None = None

    @property
    def short_hash(self) -> str | None:
        """A1111's "Model hash": the first 10 hex digits of the file's sha256 (single files only)."""
        if self._hash is None and self.path is not None and self.path.is_file():
            self._hash = file_sha256(self.path)[:10]
        return self._hash


def cache_dir() -> Path:
    """stablekit's folder in the user cache (XDG_CACHE_HOME, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stablekit"


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file, remembered in the user cache by path, size and mtime (a 4 GB file takes seconds)."""
    cache_file = cache_dir() / "hashes.json"
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        cache[key] = h.hexdigest()
        try:  # the cache is a convenience: failing to write it never fails a generation
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(cache, indent=0))
        except OSError:
            pass
    return cache[key]


# --- reading tensors --------------------------------------------------------------------------------


class _LazyTensors(Mapping[str, torch.Tensor]):
    """Key -> tensor, read on access; `shapes` gives meta tensors for detection without reading."""

    def __init__(self, keys: list[str], shape_of: Callable[[str], tuple[tuple[int, ...], torch.dtype]], read: Callable[[str], torch.Tensor]):
        self._keys, self._shape_of, self._read = keys, shape_of, read

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._read(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shapes(self) -> dict[str, torch.Tensor]:
        return {k: torch.empty(shape, dtype=dtype, device="meta") for k in self._keys for shape, dtype in [self._shape_of(k)]}


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _read_safetensors(path: Path) -> Mapping[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        f = safe_open(str(path), framework="pt", device="cpu")  # memory-mapped
        keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path.name}: not a readable safetensors file ({e})") from None

    def read(key: str) -> torch.Tensor:
        try:
            return f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{path.name}: tensor '{key}' cannot be read, the file may be truncated ({e})") from None

    def shape_of(key: str) -> tuple[tuple[int, ...], torch.dtype]:
        s = f.get_slice(key)
        if s.get_dtype() not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path.name}: tensor '{key}' has unsupported dtype {s.get_dtype()}")
        return tuple(s.get_shape()), _SAFETENSORS_DTYPES[s.get_dtype()]

    return _LazyTensors(keys, shape_of, read)


def _reason(e: BaseException) -> str:
    """The first line of an exception's message, without terminal colour codes; its type if it has none."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _read_pickle(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global it does not know, before calling it.
        wanted = re.search(r"GLOBAL ([\w.]+)", str(e))
        if wanted or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path.name}: refused to load. The pickle asks for "
                f"{wanted.group(1) if wanted else 'a Python object'}, which would run code when loaded; "
                "nothing in it was executed. Convert it to .safetensors with a tool you trust, "
                "or get a .safetensors copy of the model."
            ) from None
        raise CheckpointError(f"{path.name}: not a readable PyTorch checkpoint (damaged or not a checkpoint: {_reason(e)})") from None
    except Exception as e:  # torch.load raises many types for damaged files (EOFError, KeyError, zip errors...)
        raise CheckpointError(f"{path.name}: not a readable PyTorch checkpoint ({_reason(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path.name}: does not hold a state dict of tensors")
    return obj


def read_tensors(path: Path) -> Mapping[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_pickle(path)


class _Remapped(Mapping[str, torch.Tensor]):
    """New key -> tensor made on access from source tensors by a recipe (see diffusers_keys)."""

    def __init__(self, parts: list[tuple[Mapping[str, torch.Tensor], dict[str, Recipe]]]):
        self._recipes = {k: (source, recipe) for source, recipes in parts for k, recipe in recipes.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        source, (keys, combine) = self._recipes[key]
        return combine(*(source[k] for k in keys))

    def __iter__(self):
        return iter(self._recipes)

    def __len__(self) -> int:
        return len(self._recipes)

    def shapes(self) -> dict[str, torch.Tensor]:
        sources = {id(s): s for s, _ in self._recipes.values()}
        shapes = {i: shapes_of(s) for i, s in sources.items()}  # once per source, not per key
        return {k: combine(*(shapes[id(s)][x] for x in keys)) for k, (s, (keys, combine)) in self._recipes.items()}


def shapes_of(sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Meta tensors (shape and dtype only) for lazily read mappings; the mapping itself otherwise."""
    return sd.shapes() if isinstance(sd, (_LazyTensors, _Remapped)) else sd


# --- hints: what the weights cannot tell --------------------------------------------------------------


def _yaml_hints(path: Path) -> tuple[Hints, list[str]]:
    """A same-name `.yaml` next to the checkpoint (the popular web UIs' convention, LDM config format)."""
    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file():
        return Hints(), []
    import yaml

    try:
        conf = yaml.safe_load(sidecar.read_text())
        params = conf["model"]["params"]
    except Exception as e:
        raise CheckpointError(f"{sidecar.name}: not an LDM model config ({e})") from None
    unet = (params.get("unet_config") or {}).get("params", {})
    pred = params.get("parameterization")
    hints = Hints(
        prediction={"v": "v", "eps": "eps"}.get(pred) if pred else None,
        prediction_source=f"{sidecar.name}" if pred else None,
        unet_num_heads=unet.get("num_heads") if unet.get("num_heads", -1) > 0 else None,
        unet_num_head_channels=unet.get("num_head_channels") if unet.get("num_head_channels", -1) > 0 else None,
        vae_scale_factor=params.get("scale_factor"),
    )
    if pred and hints.prediction is None:
        raise CheckpointError(f"{sidecar.name}: unknown parameterization '{pred}' (expected eps or v)")
    return hints, [f"config: {sidecar.name}"]


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read config ({e})") from None


def _schedule_from_diffusers(conf: dict) -> ScheduleConfig:
    kind = conf.get("beta_schedule", "scaled_linear")
    if kind != "scaled_linear":
        raise CheckpointError(f"scheduler beta_schedule '{kind}' is not supported (Stable Diffusion uses scaled_linear)")
    return ScheduleConfig(conf.get("beta_start", 0.00085), conf.get("beta_end", 0.012), conf.get("num_train_timesteps", 1000))


# --- diffusers folders --------------------------------------------------------------------------------


def _component_weights(folder: Path, stems: tuple[str, ...]) -> Path:
    for stem in stems:
        for suffix in (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin"):
            if (folder / (stem + suffix)).is_file():
                return folder / (stem + suffix)
    raise CheckpointError(f"{folder}: no weights file ({' or '.join(s + '.safetensors' for s in stems)})")


def _unet_head_hints(conf: dict) -> dict:
    # diffusers calls the head count "attention_head_dim"; 8 is UNet2DConditionModel's own default when absent.
    heads = conf.get("num_attention_heads") or conf.get("attention_head_dim", 8)
    channels = conf["block_out_channels"]
    if isinstance(heads, int) or len(set(heads)) == 1:
        return {"unet_num_heads": heads if isinstance(heads, int) else heads[0]}
    per_head = {c // h for c, h in zip(channels, heads)}
    if len(per_head) != 1:
        raise CheckpointError(f"unet config: head counts {heads} fit neither a fixed count nor a fixed head width")
    return {"unet_num_head_channels": per_head.pop()}


def read_diffusers_folder(folder: Path) -> tuple[Mapping[str, torch.Tensor], Hints, ScheduleConfig, list[str]]:
    for sub in ("unet", "vae", "text_encoder"):
        if not (folder / sub / "config.json").is_file():
            raise CheckpointError(f"{folder}: not a diffusers Stable Diffusion folder ({sub}/config.json is missing)")
    unet_conf = _json(folder / "unet" / "config.json")
    vae_conf = _json(folder / "vae" / "config.json")
    text_conf = _json(folder / "text_encoder" / "config.json")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched_conf = _json(sched_path) if sched_path.is_file() else {}

    def load(sub: str, stems: tuple[str, ...]) -> Mapping[str, torch.Tensor]:
        return read_tensors(_component_weights(folder / sub, stems))

    unet = load("unet", ("diffusion_pytorch_model",))
    vae = load("vae", ("diffusion_pytorch_model",))
    text = load("text_encoder", ("model", "pytorch_model"))
    openclip = text_conf.get("hidden_act") == "gelu"  # SD 2's OpenCLIP tower; SD 1's CLIP uses quick_gelu
    sd = _Remapped([
        (unet, unet_to_ldm(unet, unet_conf.get("layers_per_block", 2))),
        (vae, vae_to_ldm(vae, len(vae_conf["block_out_channels"]))),
        (text, openclip_to_ldm(text) if openclip else clip_to_ldm(text)),
    ])

    pred = {"epsilon": "eps", "v_prediction": "v"}.get(sched_conf.get("prediction_type", ""))
    hints = Hints(
        prediction=pred,
        prediction_source="scheduler/scheduler_config.json" if pred else None,
        vae_scale_factor=vae_conf.get("scaling_factor"),
        text_layers=text_conf.get("num_hidden_layers"),
        **_unet_head_hints(unet_conf),
    )
    if sched_conf.get("prediction_type") and pred is None:
        raise CheckpointError(f"scheduler prediction_type '{sched_conf['prediction_type']}' is not supported")
    return sd, hints, _schedule_from_diffusers(sched_conf), ["format: diffusers folder"]


def _download(repo_id: str) -> Path:
    """A hub id -> local path: `owner/name` is a diffusers repo, `owner/name/file.safetensors` one file."""
    parts = repo_id.split("/")
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if len(parts) > 2:
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
        # Only the full-precision weights of the three networks: no fp16/EMA variants, no safety checker.
        patterns = ["model_index.json", "*/config.json", "scheduler/*.json",
                    "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                    "text_encoder/model.safetensors"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo: all reach the user as one clear message
        raise CheckpointError(
            f"'{repo_id}' is not a local file, and it cannot be had from the Hugging Face hub "
            f"({type(e).__name__}{'' if _reason(e) == type(e).__name__ else ': ' + _reason(e)}). "
            f"On a machine with internet run `huggingface-cli download {'/'.join(parts[:2])}` and pass the "
            "downloaded folder, or pass a local .safetensors file."
        ) from None


# --- loading ------------------------------------------------------------------------------------------


def resolve(spec: str | Path) -> Path:
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    # Hub ids: `owner/name` (a diffusers repo) or `owner/name/file.safetensors`. A path whose first
    # folder exists here, or that starts like a local path, is a local file that is missing.
    repo_like = text.count("/") == 1 and not text.endswith(SINGLE_FILE_SUFFIXES)
    file_like = text.count("/") >= 2 and text.endswith(SINGLE_FILE_SUFFIXES)
    local_like = text.startswith((".", "/", "~")) or Path(text.split("/")[0]).is_dir()
    if (repo_like or file_like) and not local_like:
        return _download(text)
    raise CheckpointError(f"model '{spec}' not found: give a checkpoint file, a diffusers folder or a hub repo id")


@dataclass
class OpenedCheckpoint:
    """A checkpoint read as far as detection: its config and lazily readable tensors."""

    config: ModelConfig
    tensors: Mapping[str, torch.Tensor]
    name: str
    path: Path
    notes: list[str]


def open_checkpoint(spec: str | Path, *, prediction: Prediction | None = None) -> OpenedCheckpoint:
    """Find the files, read keys and shapes, detect the model.

    Safetensors weights are not read here (only their headers); pickles are read whole by torch.load.
    """
    path = resolve(spec)
    notes: list[str] = []
    schedule = ScheduleConfig()
    if path.is_dir():
        sd, hints, schedule, notes = read_diffusers_folder(path)
    elif path.suffix in SINGLE_FILE_SUFFIXES:
        sd = read_tensors(path)
        hints, notes = _yaml_hints(path)
        notes.insert(0, f"format: single file ({path.suffix})")
    else:
        raise CheckpointError(f"{path.name}: unknown checkpoint type; expected one of {', '.join(SINGLE_FILE_SUFFIXES)} or a folder")
    if prediction is not None:
        hints = replace(hints, prediction=prediction, prediction_source="--prediction")
    cfg = replace(detect(shapes_of(sd), hints), schedule=schedule)
    source = hints.prediction_source or "default; weights cannot tell, use --prediction v or a .yaml for v-models"
    notes.append(f"prediction: {cfg.prediction} ({source})")
    if not (hints.unet_num_heads or hints.unet_num_head_channels):
        u = cfg.unet
        heads = f"{u.num_heads} heads" if u.num_heads > 0 else f"{u.num_head_channels} channels per head"
        notes.append(f"attention: {heads} (the {cfg.family.upper()} convention; a .yaml can say otherwise)")
    return OpenedCheckpoint(cfg, sd, path.stem if path.is_file() else path.name, path, notes)


def load_model(
    spec: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    prediction: Prediction | None = None,
) -> LoadedModel:
    """Read, detect and build a model; weights go straight to `dtype` on `device`."""
    ckpt = open_checkpoint(spec, prediction=prediction)
    model = build_and_load(ckpt.config, ckpt.tensors, dtype=dtype, device=device)
    return LoadedModel(model, ckpt.config, ckpt.name, ckpt.path, ckpt.notes)


def build_and_load(
    cfg: ModelConfig, sd: Mapping[str, torch.Tensor], *, dtype: torch.dtype, device: torch.device | str
) -> StableDiffusionModel:
    """Build modules without memory (meta device), check keys and shapes, then assign the weights."""
    with torch.device("meta"):
        model = StableDiffusionModel(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    present = [k for k in sd if not unused_keys(k, cfg)]
    shapes = shapes_of(sd)
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    wrong = [f"{k}: file {tuple(shapes[k].shape)} vs model {tuple(expected[k])}"
             for k in present if k in expected and tuple(shapes[k].shape) != tuple(expected[k])]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrongly shaped keys", wrong)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"checkpoint does not match the detected {cfg.name} model: " + "; ".join(problems))
    weights = {}
    for k in present:  # one tensor at a time: the target-dtype copy is the only full copy
        t = sd[k]
        weights[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.requires_grad_(False).eval()
