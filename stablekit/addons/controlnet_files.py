"""ControlNet files people bring, read into a `ControlNet` checked against the model it serves.

Sources: the original layout (`control_v11p_sd15_canny.pth` / `.safetensors`, keys `input_hint_block.*`,
`zero_convs.*`, `middle_block_out.*` plus the encoder copy, bare or under `control_model.`; fp16
"pruned" files alike), a "difference" file (the encoder stored as its difference to the base UNet,
marked by a `difference` key), and diffusers' `ControlNetModel` (a folder with `config.json`, or its
weights file alone), converted by key rules that reuse the UNet's table. Pickles load weights-only.

Head counts are not in the weights. They come from the diffusers config, else a same-name `.yaml`
(the web UI extension's convention, `control_stage_config`), else the base model's own when the
ControlNet copies its family (it was trained as that UNet's copy), else SD 1's 8 heads / SD 2's
64-channel heads. The web UI extension builds every SD 1/2 ControlNet with 8 heads; a ControlNet
trained from SD 2 (`cldm_v21.yaml`) has 64-channel heads, as ComfyUI and diffusers run it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import torch

from ..checkpoint.files import Remapped, read_tensors, shapes_of, shown_keys
from ..checkpoint.sources import SINGLE_FILE_SUFFIXES, _component_weights, _json, _unet_head_hints
from ..config import ModelConfig
from ..detect import CheckpointError, Hints, detect_unet
from ..diffusers_keys import Recipe, same, unet_to_ldm
from ..models.controlnet import ControlNet, ControlNetConfig
from ..models.meta import empty_modules

PREFIX = "control_model."
PARTS = ("time_embed.", "label_emb.", "input_hint_block.", "input_blocks.", "zero_convs.", "middle_block.",
         "middle_block_out.")
FAMILIES = {768: "SD 1", 1024: "SD 2", 2048: "SDXL"}  # by text width


@dataclass
class LoadedControlNet:
    name: str  # the file's (or folder's) stem: what --control and the API's model names match
    path: Path
    net: ControlNet
    short_hash: str  # the web UI's model hash of the file (its "name [hash]" label)

    @property
    def label(self) -> str:
        return f"{self.name} [{self.short_hash}]"


def family(unet) -> str:
    """SD 1 (768-wide CLIP text, convolution projections) or SD 2 (1024-wide OpenCLIP, linear ones)."""
    generation = 2 if unet.use_linear_in_transformer else 1
    return FAMILIES.get(unet.context_dim, f"an SD {generation}-like model with text width {unet.context_dim}")


def webui_model_hash(path: Path) -> str:
    """The web UI's (old) model hash: sha256 of 64 KiB at 1 MiB into the file, 8 hex digits; what the
    ControlNet extension shows after a model's name. A folder hashes its weights file."""
    if path.is_dir():
        path = _component_weights(path, ("diffusion_pytorch_model",))
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


# --- reading ---------------------------------------------------------------------------------------


def _diffusers_to_original(keys: list[str], layers_per_block: int | None) -> dict[str, Recipe]:
    """diffusers ControlNetModel keys -> original ones: the encoder by the UNet's table, the rest here."""
    if layers_per_block is None:  # a weights file without its config: down block 0's resnets tell
        layers_per_block = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
    n_blocks = 1 + max((int(m.group(1)) for k in keys if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))),
                       default=-1)
    own = {
        r"controlnet_cond_embedding\.conv_in\.(.+)": lambda r: f"input_hint_block.0.{r}",
        r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)": lambda n, r: f"input_hint_block.{2 * (int(n) + 1)}.{r}",
        r"controlnet_cond_embedding\.conv_out\.(.+)": lambda r: f"input_hint_block.{2 * (n_blocks + 1)}.{r}",
        r"controlnet_down_blocks\.(\d+)\.(.+)": lambda n, r: f"zero_convs.{n}.0.{r}",
        r"controlnet_mid_block\.(.+)": lambda r: f"middle_block_out.0.{r}",
    }
    out: dict[str, Recipe] = {}
    encoder_keys = []
    for key in keys:
        for pattern, make in own.items():
            if m := re.fullmatch(pattern, key):
                out[make(*m.groups())] = ((key,), same)
                break
        else:
            encoder_keys.append(key)
    for new, recipe in unet_to_ldm(encoder_keys, layers_per_block).items():
        out[new.removeprefix("model.diffusion_model.")] = recipe
    return out


def _yaml_heads(path: Path) -> Hints:
    """Head counts from a same-name .yaml (`model.params.control_stage_config.params`)."""
    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file():
        return Hints()
    import yaml

    try:
        params = yaml.safe_load(sidecar.read_text())["model"]["params"]["control_stage_config"]["params"]
    except Exception as e:
        raise CheckpointError(f"{sidecar.name}: not a ControlNet config (no control_stage_config: {e})") from None
    heads, channels = params.get("num_heads", -1), params.get("num_head_channels", -1)
    return Hints(unet_num_heads=heads if heads > 0 else None, unet_num_head_channels=channels if channels > 0 else None)


def read_controlnet(path: Path) -> tuple[Mapping[str, torch.Tensor], Hints]:
    """Original-layout tensors (bare keys) and the head hints, from any of the sources above."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: not a diffusers ControlNet folder (config.json is missing)")
        conf = _json(path / "config.json")
        if conf.get("_class_name", "ControlNetModel") != "ControlNetModel" or "block_out_channels" not in conf:
            raise CheckpointError(f"{path / 'config.json'}: not a ControlNetModel config")
        sd = read_tensors(_component_weights(path, ("diffusion_pytorch_model",)))
        return Remapped([(sd, _diffusers_to_original(list(sd), conf.get("layers_per_block", 2)))]), \
            Hints(**_unet_head_hints(conf), unet_norm_groups=conf.get("norm_num_groups"))
    if not path.is_file():
        raise CheckpointError(f"ControlNet '{path}' not found: give a .safetensors/.pth file or a diffusers folder")
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"{path.name}: unknown ControlNet file type; expected {', '.join(SINGLE_FILE_SUFFIXES)}")
    sd = read_tensors(path)
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        return Remapped([(sd, _diffusers_to_original(list(sd), None))]), _yaml_heads(path)
    keys = {k.removeprefix(PREFIX): k for k in sd}
    if "lora_controlnet" in keys:
        raise CheckpointError(f"{path.name}: a control-LoRA (SDXL); only full ControlNets are supported")
    if "input_hint_block.0.weight" not in keys:
        raise CheckpointError(f"{path.name}: not a ControlNet (no input_hint_block.* keys; found e.g. "
                              f"{shown_keys(list(sd)[:3]) or 'none'})")
    stray = sorted(k for k in keys if k != "difference" and not k.startswith(PARTS))
    if stray:
        raise CheckpointError(f"{path.name}: keys that belong to no part of a ControlNet: {shown_keys(stray)}")
    return Remapped([(sd, {new: ((old,), same) for new, old in keys.items()})]), _yaml_heads(path)


def detect_controlnet(sd: Mapping[str, torch.Tensor], hints: Hints) -> ControlNetConfig:
    shapes = shapes_of(sd)
    unet = detect_unet(shapes, hints, prefix="")
    n_convs = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"input_hint_block\.(\d+)\.weight", k))) // 2
    if n_convs < 2 or n_convs % 2:
        raise CheckpointError(f"unsupported ControlNet map encoder: {n_convs} convolutions (expected 2 + 2 per level)")
    widths = [shapes["input_hint_block.0.weight"].shape[0]]
    widths += [shapes[f"input_hint_block.{4 * i}.weight"].shape[0] for i in range(1, n_convs // 2)]
    return ControlNetConfig(unet, hint_channels=shapes["input_hint_block.0.weight"].shape[1],
                            hint_block_channels=tuple(widths))


def _fits(net_cfg: ControlNetConfig, base: ModelConfig, name: str) -> ControlNetConfig:
    """Check the ControlNet serves this model; take the base's head counts where it is its family's copy."""
    c, u = net_cfg.unet, base.unet
    if (c.context_dim, c.use_linear_in_transformer) != (u.context_dim, u.use_linear_in_transformer):
        raise CheckpointError(f"{name} is a ControlNet for {family(c)}; the model is {family(u)}")
    same_encoder = (c.model_channels, c.channel_mult, c.num_res_blocks, c.attention_levels) == \
        (u.model_channels, u.channel_mult, u.num_res_blocks, u.attention_levels)
    if not same_encoder:
        raise CheckpointError(f"{name}: its encoder ({c.model_channels} channels x {c.channel_mult}, "
                              f"{c.num_res_blocks} res blocks) does not match the model's UNet "
                              f"({u.model_channels} x {u.channel_mult}, {u.num_res_blocks}): its residuals would not fit")
    if c.in_channels not in (4, u.in_channels):
        raise CheckpointError(f"{name} reads {c.in_channels} input channels; the model's UNet takes {u.in_channels}")
    return net_cfg


def load_controlnet(path: str | Path, base: ModelConfig, base_unet: torch.nn.Module | None = None,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedControlNet:
    """A ControlNet file or folder, checked against `base` (its family, encoder shape and input
    channels), in `dtype` on `device`. `base_unet` supplies the weights a difference file adds to."""
    path = Path(path)
    sd, hints = read_controlnet(path)
    cfg = _fits(detect_controlnet(sd, _with_base_defaults(hints, shapes_of(sd), base)), base, path.name)
    with empty_modules():
        net = ControlNet(cfg)
    wanted = net.state_dict()
    missing = sorted(set(wanted) - set(sd))
    unexpected = sorted(set(sd) - set(wanted) - {"difference"})
    if missing or unexpected:
        raise CheckpointError(f"{path.name}: the weights do not fit the ControlNet their shapes describe"
                              + (f"; missing {shown_keys(missing)}" if missing else "")
                              + (f"; unexpected {shown_keys(unexpected)}" if unexpected else ""))
    base_weights = _difference_base(sd, base_unet, path.name)
    tensors = {}
    for key in wanted:
        t = sd[key].to(torch.float32)
        if key in base_weights:
            t = t + base_weights[key].to(torch.float32)
        tensors[key] = t.to(dtype)
    net.load_state_dict(tensors, strict=True, assign=True)
    return LoadedControlNet(path.stem, path, net.to(device).eval(), webui_model_hash(path))


def _with_base_defaults(hints: Hints, shapes: Mapping[str, torch.Tensor], base: ModelConfig) -> Hints:
    """What the file's own config leaves out, from the base model where the ControlNet is its family's copy."""
    if hints.unet_norm_groups is None:
        hints = replace(hints, unet_norm_groups=base.unet.norm_groups)  # a copy keeps its UNet's groups
    if hints.unet_num_heads or hints.unet_num_head_channels:
        return hints
    plain = detect_unet(shapes, Hints(), prefix="")
    u = base.unet
    if (plain.context_dim, plain.use_linear_in_transformer) != (u.context_dim, u.use_linear_in_transformer):
        return hints  # not the base's family: _fits refuses it, or the family's own head counts apply
    return replace(hints, unet_num_heads=u.num_heads if u.num_heads > 0 else None,
                   unet_num_head_channels=u.num_head_channels if u.num_head_channels > 0 else None)


def _difference_base(sd: Mapping[str, torch.Tensor], base_unet: torch.nn.Module | None, name: str,
                     ) -> dict[str, torch.Tensor]:
    """For a difference file: the base UNet's weights for the keys the two share (else none)."""
    if "difference" not in sd:
        return {}
    if base_unet is None:
        raise CheckpointError(f"{name} stores its weights as a difference to the base UNet, and no UNet was given")
    return {k: v for k, v in base_unet.state_dict().items() if k in sd}


# --- finding one by name ---------------------------------------------------------------------------


def controlnet_files(folder: Path | None) -> dict[str, Path]:
    """The ControlNets in a folder (searched recursively, as the extension does): weight files and
    diffusers ControlNetModel folders, by lower-case stem."""
    if folder is None or not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
            if (path.parent / "config.json").is_file() and path.stem.startswith("diffusion_pytorch_model"):
                continue  # a diffusers folder's weights: listed as the folder
            found.setdefault(path.stem.lower(), path)
        elif path.is_dir() and (path / "config.json").is_file():
            found.setdefault(path.name.lower(), path)
    return found


def controlnet_labels(folder: Path | None) -> list[str]:
    """The folder's ControlNets as the extension lists them: "name [hash]"."""
    return [f"{p.stem if p.is_file() else p.name} [{webui_model_hash(p)}]" for p in controlnet_files(folder).values()]


def find_controlnet(name: str, folder: Path | None, allow_paths: bool = True) -> Path:
    """A path as it is (with `allow_paths`; the HTTP API names only what the folder holds), else a name
    in `folder`: "control_v11p_sd15_canny" or its "name [hash]" label, any case (the extension's lookup)."""
    path = Path(name)
    if allow_paths and path.exists():
        return path
    stem = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", name).strip().lower()
    known = controlnet_files(folder)
    if stem in known:
        return known[stem]
    if folder is None:
        raise CheckpointError(f"ControlNet '{name}' not found: give a file or folder, or a ControlNet folder "
                              "(--controlnet-dir) to find names in")
    listed = ", ".join(sorted(known)) or "none"
    raise CheckpointError(f"unknown ControlNet '{name}'; {folder} holds: {listed}")
