"""Where weights and the facts they cannot tell come from: a sidecar `.yaml`, a diffusers
folder's configs, a Hugging Face repo id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from ..config import LowResConfig, ScheduleConfig
from ..detect import CheckpointError, Hints
from ..diffusers_keys import clip_to_ldm, openclip_to_ldm, unet_to_ldm, vae_to_ldm
from .files import Remapped, reason, read_tensors

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def yaml_hints(path: Path) -> tuple[Hints, list[str]]:
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
    ddconfig = ((params.get("first_stage_config") or {}).get("params") or {}).get("ddconfig") or {}
    low_scale = (params.get("low_scale_config") or {}).get("params") or {}
    pred = params.get("parameterization")
    if unet.get("disable_middle_self_attn"):
        raise CheckpointError(f"{sidecar.name}: disable_middle_self_attn is not supported (a text-only middle block)")
    hints = Hints(
        prediction={"v": "v", "eps": "eps"}.get(pred) if pred else None,
        prediction_source=f"{sidecar.name}" if pred else None,
        unet_num_heads=unet.get("num_heads") if unet.get("num_heads", -1) > 0 else None,
        unet_num_head_channels=unet.get("num_head_channels") if unet.get("num_head_channels", -1) > 0 else None,
        vae_scale_factor=params.get("scale_factor"),
        latent_size=_positive_int(params.get("image_size")),  # LatentDiffusion's, not the unused UNet one
        # Not LDM keys: diffusers' name, for small models whose GroupNorms are not SD's 32 groups.
        unet_norm_groups=_positive_int(unet.get("norm_num_groups")),
        vae_norm_groups=_positive_int(ddconfig.get("norm_num_groups")),
        unet_cross_only_levels=_flags_to_levels(unet.get("disable_self_attentions"), sidecar.name),
        schedule=_ldm_schedule(params, sidecar.name),
        lowres=_ldm_lowres(low_scale, sidecar.name) if low_scale else None,
    )
    if pred and hints.prediction is None:
        raise CheckpointError(f"{sidecar.name}: unknown parameterization '{pred}' (expected eps or v)")
    return hints, [f"config: {sidecar.name}"]


# LDM's own defaults (DDPM and AbstractLowScaleModel.register_schedule) for a key a config leaves out.
_LDM_SCHEDULE = ScheduleConfig(linear_start=1e-4, linear_end=2e-2, timesteps=1000)


def _ldm_schedule(params: dict, name: str) -> ScheduleConfig | None:
    """LDM's `linear_start`, `linear_end`, `timesteps` (None if it gives none); its "linear" betas are
    diffusers' scaled_linear (linspace of the square roots, squared)."""
    if params.get("beta_schedule", "linear") != "linear":
        raise CheckpointError(f"{name}: beta_schedule '{params['beta_schedule']}' is not supported (expected linear)")
    if not any(k in params for k in ("linear_start", "linear_end", "timesteps")):
        return None
    d = _LDM_SCHEDULE
    return ScheduleConfig(float(params.get("linear_start", d.linear_start)), float(params.get("linear_end", d.linear_end)),
                          _positive_int(params.get("timesteps")) or d.timesteps)


def _ldm_lowres(low_scale: dict, name: str) -> LowResConfig:
    """`low_scale_config.params` of LDM's ImageConcatWithNoiseAugmentation (the x4 upscaler)."""
    sched = _ldm_schedule(low_scale.get("noise_schedule_config") or {}, name) or _LDM_SCHEDULE
    level = _positive_int(low_scale.get("max_noise_level")) or LowResConfig.max_noise_level
    return LowResConfig(level, sched.linear_start, sched.linear_end, sched.timesteps)


def _flags_to_levels(flags: object, name: str) -> tuple[int, ...] | None:
    """Per-level booleans (LDM disable_self_attentions, diffusers only_cross_attention) -> the True levels."""
    if flags is None:
        return None
    if not isinstance(flags, (list, tuple)) or not all(isinstance(f, bool) for f in flags):
        raise CheckpointError(f"{name}: expected a list of true/false per level for the text-only attentions, got {flags!r}")
    return tuple(i for i, f in enumerate(flags) if f)


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read config ({e})") from None


def _schedule_from_diffusers(conf: dict, name: str = "scheduler") -> ScheduleConfig:
    kind = conf.get("beta_schedule", "scaled_linear")
    if kind != "scaled_linear":
        raise CheckpointError(f"{name} beta_schedule '{kind}' is not supported (Stable Diffusion uses scaled_linear)")
    return ScheduleConfig(conf.get("beta_start", 0.00085), conf.get("beta_end", 0.012), conf.get("num_train_timesteps", 1000),
                          zero_terminal_snr=bool(conf.get("rescale_betas_zero_snr", False)))


def _lowres_from_diffusers(folder: Path) -> LowResConfig | None:
    """StableDiffusionUpscalePipeline's `max_noise_level` (model_index.json) and `low_res_scheduler`."""
    index_path, sched_path = folder / "model_index.json", folder / "low_res_scheduler" / "scheduler_config.json"
    level = _positive_int(_json(index_path).get("max_noise_level")) if index_path.is_file() else None
    if level is None and not sched_path.is_file():
        return None
    d = LowResConfig()
    s = (_schedule_from_diffusers(_json(sched_path), "low_res_scheduler") if sched_path.is_file()
         else ScheduleConfig(d.linear_start, d.linear_end, d.timesteps))
    return LowResConfig(level or d.max_noise_level, s.linear_start, s.linear_end, s.timesteps)


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


def _only_cross_levels(conf: dict) -> tuple[int, ...]:
    """UNet2DConditionModel's `only_cross_attention`: one flag for all down blocks or one per block."""
    flags = conf.get("only_cross_attention", False)  # diffusers' default: every attn1 attends to the image
    if isinstance(flags, bool):
        flags = [flags] * len(conf["block_out_channels"])
    return _flags_to_levels(flags, "unet/config.json only_cross_attention") or ()


def read_diffusers_folder(folder: Path) -> tuple[Mapping[str, torch.Tensor], Hints, list[str]]:
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
    sd = Remapped([
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
        latent_size=_positive_int(unet_conf.get("sample_size")),
        unet_norm_groups=_positive_int(unet_conf.get("norm_num_groups")),
        vae_norm_groups=_positive_int(vae_conf.get("norm_num_groups")),
        unet_cross_only_levels=_only_cross_levels(unet_conf),
        schedule=_schedule_from_diffusers(sched_conf) if sched_path.is_file() else None,
        lowres=_lowres_from_diffusers(folder),
        **_unet_head_hints(unet_conf),
    )
    if sched_conf.get("prediction_type") and pred is None:
        raise CheckpointError(f"scheduler prediction_type '{sched_conf['prediction_type']}' is not supported")
    return sd, hints, ["format: diffusers folder"]


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
            f"({type(e).__name__}{'' if reason(e) == type(e).__name__ else ': ' + reason(e)}). "
            f"On a machine with internet run `huggingface-cli download {'/'.join(parts[:2])}` and pass the "
            "downloaded folder, or pass a local .safetensors file."
        ) from None


DEMO_NAME = "shapes-demo"  # the built-in demo model's name, wherever a model is asked for


def resolve(spec: str | Path) -> Path:
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    if text == DEMO_NAME:
        from ..demo import demo_model

        return demo_model()
    # Hub ids: `owner/name` (a diffusers repo) or `owner/name/file.safetensors`. A path whose first
    # folder exists here, or that starts like a local path, is a local file that is missing.
    repo_like = text.count("/") == 1 and not text.endswith(SINGLE_FILE_SUFFIXES)
    file_like = text.count("/") >= 2 and text.endswith(SINGLE_FILE_SUFFIXES)
    local_like = text.startswith((".", "/", "~")) or Path(text.split("/")[0]).is_dir()
    if (repo_like or file_like) and not local_like:
        return _download(text)
    raise CheckpointError(f"model '{spec}' not found: give a checkpoint file, a diffusers folder or a hub repo id")
