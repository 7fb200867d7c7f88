"""Model detection: read an LDM-layout state dict's keys and shapes, return its configs.

Everything that the weights determine is read from them (sizes, depth, attention levels,
input channels, text-encoder layout, which levels attend to the text only). What they cannot
tell (prediction type, head counts of non-standard sizes, the schedule) comes from `Hints`,
which the loader fills from a config file, a sidecar `.yaml` or a flag; each hint records
where it came from. For the x4 upscaler, whose single file usually comes without a config,
`upscaler_hints` fills the rest from its published x4-upscaling.yaml.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Mapping

from .config import (
    INPUT_KINDS,
    PRESETS,
    SD1_UNET,
    SD2_UNET,
    InputKind,
    LowResConfig,
    ModelConfig,
    Prediction,
    ScheduleConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
OPENCLIP = "cond_stage_model.model."


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message meant for a person."""


@dataclass(frozen=True)
class Hints:
    """Facts the weights cannot tell, each with the name of its source (None = not given)."""

    prediction: Prediction | None = None
    prediction_source: str | None = None
    unet_num_heads: int | None = None
    unet_num_head_channels: int | None = None
    vae_scale_factor: float | None = None
    text_layers: int | None = None  # computed blocks; SD 2 files carry one more
    latent_size: int | None = None  # the training latent size (LDM image_size, diffusers sample_size)
    unet_norm_groups: int | None = None  # GroupNorm groups, where not SD's 32 (diffusers' norm_num_groups)
    vae_norm_groups: int | None = None
    # Levels whose attn1 attends to the text (LDM disable_self_attentions); used only where the
    # weights cannot tell, i.e. where a level's channels equal the context width.
    unet_cross_only_levels: tuple[int, ...] | None = None
    schedule: ScheduleConfig | None = None  # None: SD's 0.00085..0.012
    lowres: LowResConfig | None = None  # the upscaler's noise augmentation (lowres models only)


def _count(sd: Mapping, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _shape(sd: Mapping, key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"not a Stable Diffusion checkpoint: key '{key}' is missing")
    return tuple(sd[key].shape)


def _present(sd: Mapping, *keys: str) -> bool:
    return all(k in sd for k in keys)


def detect_unet(sd: Mapping, hints: Hints, prefix: str = UNET) -> UNetConfig:
    """The UNet's config from its keys under `prefix` (a ControlNet's copy of the encoder has no
    output blocks: its out_channels are left at the latent's 4)."""
    p = prefix
    mc, in_ch = _shape(sd, p + "input_blocks.0.0.weight")[:2]
    out_ch = _shape(sd, p + "out.2.weight")[0] if p + "out.2.weight" in sd or prefix == UNET else 4
    n_in = _count(sd, re.escape(p) + r"input_blocks\.(\d+)\.")
    # Walk the input blocks: res blocks (with optional transformer) until a downsample ends the level.
    levels: list[list[int]] = [[]]
    for i in range(1, n_in):
        if p + f"input_blocks.{i}.0.op.weight" in sd:
            levels.append([])
        else:
            levels[-1].append(i)
    num_res = len(levels[0])
    if num_res == 0 or any(len(lv) != num_res for lv in levels):
        raise CheckpointError("unsupported UNet layout: levels have different numbers of res blocks")
    mults = [_shape(sd, p + f"input_blocks.{lv[0]}.0.out_layers.3.weight")[0] // mc for lv in levels]
    attention = tuple(n for n, lv in enumerate(levels) if p + f"input_blocks.{lv[0]}.1.norm.weight" in sd)
    if not attention:
        raise CheckpointError("unsupported UNet layout: no cross-attention blocks")
    first = p + f"input_blocks.{levels[attention[0]][0]}.1."
    depth = _count(sd, re.escape(first) + r"transformer_blocks\.(\d+)\.")
    context_dim = _shape(sd, first + "transformer_blocks.0.attn2.to_k.weight")[1]
    use_linear = len(_shape(sd, first + "proj_in.weight")) == 2
    blocks = {level: p + f"input_blocks.{levels[level][0]}.1." for level in attention}
    cross_only = _cross_only_levels(sd, blocks, context_dim, hints.unet_cross_only_levels)
    middle = p + "middle_block.1.transformer_blocks.0.attn1."
    if _present(sd, middle + "to_k.weight", middle + "to_q.weight") and \
            _shape(sd, middle + "to_k.weight")[1] != _shape(sd, middle + "to_q.weight")[0]:
        raise CheckpointError(f"unsupported UNet layout: '{middle}to_k.weight' attends to the text context "
                              "(LDM disable_middle_self_attn); only the levels' attentions may do so")
    # Head counts are not in the weights: SD 1 uses 8 heads, SD 2 64 channels per head.
    base = SD2_UNET if context_dim == 1024 or use_linear else SD1_UNET
    heads, head_ch = base.num_heads, base.num_head_channels
    if hints.unet_num_heads or hints.unet_num_head_channels:
        heads = hints.unet_num_heads or -1
        head_ch = hints.unet_num_head_channels or -1
    return UNetConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        model_channels=mc,
        channel_mult=tuple(mults),
        num_res_blocks=num_res,
        attention_levels=attention,
        num_heads=heads,
        num_head_channels=head_ch,
        transformer_depth=depth,
        context_dim=context_dim,
        use_linear_in_transformer=use_linear,
        norm_groups=hints.unet_norm_groups or 32,
        num_classes=sd[p + "label_emb.weight"].shape[0] if p + "label_emb.weight" in sd else 0,
        adm_in_channels=sd[p + "label_emb.0.0.weight"].shape[1] if p + "label_emb.0.0.weight" in sd else 0,
        cross_only_levels=cross_only,
    )


def _cross_only_levels(
    sd: Mapping, blocks: dict[int, str], context_dim: int, hint: tuple[int, ...] | None
) -> tuple[int, ...]:
    """The levels whose attn1 attends to the text, read off attn1.to_k's input width [C, width]:
    the level's channels (self-attention) or the context width (cross-only). Where the two are
    equal the weights cannot tell, and `hint` decides (absent: self-attention, as in SD)."""
    found = []
    for level, block in blocks.items():
        key, q_key = block + "transformer_blocks.0.attn1.to_k.weight", block + "transformer_blocks.0.attn1.to_q.weight"
        if not _present(sd, key, q_key):  # the loader's key check names what is missing
            continue
        width, channels = _shape(sd, key)[1], _shape(sd, q_key)[0]
        if width == channels == context_dim:
            cross = hint is not None and level in hint
        elif width in (channels, context_dim):
            cross = width == context_dim
        else:
            raise CheckpointError(f"'{key}' takes {width} features: neither the block's {channels} channels "
                                  f"(self-attention) nor the context width {context_dim} (cross-attention)")
        if cross:
            found.append(level)
    return tuple(found)


def detect_vae(sd: Mapping, hints: Hints) -> VAEConfig:
    p = VAE + "encoder."
    ch, in_ch = _shape(sd, p + "conv_in.weight")[:2]
    n_levels = _count(sd, re.escape(p) + r"down\.(\d+)\.")
    num_res = _count(sd, re.escape(p) + r"down\.0\.block\.(\d+)\.")
    mults = tuple(_shape(sd, p + f"down.{i}.block.0.conv2.weight")[0] // ch for i in range(n_levels))
    z = _shape(sd, VAE + "decoder.conv_in.weight")[1]
    out_ch = _shape(sd, VAE + "decoder.conv_out.weight")[0]
    scale = hints.vae_scale_factor if hints.vae_scale_factor is not None else VAEConfig.scale_factor
    return VAEConfig(in_ch, out_ch, ch, mults, num_res, z, norm_groups=hints.vae_norm_groups or 32, scale_factor=scale)


def detect_text(sd: Mapping, hints: Hints) -> TextEncoderConfig:
    if CLIP + "embeddings.token_embedding.weight" in sd:
        vocab, width = _shape(sd, CLIP + "embeddings.token_embedding.weight")
        layers = _count(sd, re.escape(CLIP) + r"encoder\.layers\.(\d+)\.")
        mlp = _shape(sd, CLIP + "encoder.layers.0.mlp.fc1.weight")[0]
        positions = _shape(sd, CLIP + "embeddings.position_embedding.weight")[0]
        layout = "clip"
    elif OPENCLIP + "token_embedding.weight" in sd:
        vocab, width = _shape(sd, OPENCLIP + "token_embedding.weight")
        # Original SD 2 files carry all blocks but use the penultimate one's output.
        layers = _count(sd, re.escape(OPENCLIP) + r"transformer\.resblocks\.(\d+)\.") - 1
        mlp = _shape(sd, OPENCLIP + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        positions = _shape(sd, OPENCLIP + "positional_embedding")[0]
        layout = "openclip"
    else:
        raise CheckpointError(
            "no text encoder found: expected keys under 'cond_stage_model.transformer.text_model.' (SD 1.x) "
            "or 'cond_stage_model.model.' (SD 2.x)"
        )
    if hints.text_layers is not None:
        layers = hints.text_layers
    if layers < 1:
        raise CheckpointError("the text encoder has no transformer blocks")
    return TextEncoderConfig(layout, vocab, width, layers, max(1, width // 64), mlp, positions)


def detect(sd: Mapping, hints: Hints = Hints()) -> ModelConfig:
    """LDM-layout state dict (tensors or meta tensors) -> ModelConfig."""
    if not any(k.startswith(UNET) for k in sd):
        raise CheckpointError(
            "not a Stable Diffusion checkpoint: no 'model.diffusion_model.*' keys "
            f"(found {len(sd)} keys, e.g. {', '.join(list(sd)[:3]) or 'none'})"
        )
    hints = upscaler_hints(sd, hints)[0]
    unet = detect_unet(sd, hints)
    text = detect_text(sd, hints)
    if text.width != unet.context_dim:
        raise CheckpointError(f"text encoder width {text.width} does not match UNet context width {unet.context_dim}")
    family = "sd2" if text.layout == "openclip" else "sd1"
    vae = detect_vae(sd, hints)
    kind = input_kind(unet, vae)
    lowres = (hints.lowres or LowResConfig()) if kind.name == "lowres" else None
    return ModelConfig(family, kind.name, hints.prediction or "eps", text, unet, vae,
                       schedule=hints.schedule or ScheduleConfig(), lowres=lowres)


# What the x4 upscaler's weights cannot tell, as its published config says (the preset's source).
X4_CONFIG = "x4-upscaling.yaml"
_X4 = PRESETS["sd2-x4-upscaler-v"]
X4_HINTS = Hints(prediction=_X4.prediction, unet_num_heads=_X4.unet.num_heads, vae_scale_factor=_X4.vae.scale_factor,
                 unet_cross_only_levels=_X4.unet.cross_only_levels, schedule=_X4.schedule, lowres=_X4.lowres)


def upscaler_hints(sd: Mapping, hints: Hints) -> tuple[Hints, list[str]]:
    """For an upscaler (4 + 3 input channels), the x4 config's values for the facts no source gave,
    and a note naming them; other models' hints are returned as they are."""
    unet_in, vae_z = UNET + "input_blocks.0.0.weight", VAE + "decoder.conv_in.weight"
    if unet_in not in sd or vae_z not in sd or sd[unet_in].shape[1] - sd[vae_z].shape[1] != INPUT_KINDS["lowres"].channels:
        return hints, []
    x4 = X4_HINTS
    facts = {
        "prediction": f"{x4.prediction}-prediction",
        "unet_num_heads": f"{x4.unet_num_heads} attention heads",
        "vae_scale_factor": f"VAE scale {x4.vae_scale_factor}",
        "unet_cross_only_levels": f"text-only attn1 at levels {x4.unet_cross_only_levels} where the weights cannot tell",
        "schedule": f"schedule {x4.schedule.linear_start:g}..{x4.schedule.linear_end:g}",
        "lowres": f"noise augmentation up to level {x4.lowres.max_noise_level}",
    }
    given = {name for name in facts if getattr(hints, name) is not None}
    if hints.unet_num_head_channels:  # a head width is a head convention too
        given.add("unet_num_heads")
    filled: dict[str, object] = {name: getattr(x4, name) for name in facts if name not in given}
    if not filled:
        return hints, []
    said = [facts[name] for name in filled]
    if "prediction" in filled:
        filled["prediction_source"] = f"{X4_CONFIG}, the upscaler's published config; none came with the model"
    return replace(hints, **filled), [f"upscaler: {', '.join(said)} from {X4_CONFIG} (no config gave them)"]


def input_kind(unet: UNetConfig, vae: VAEConfig) -> InputKind:
    """The model kind from the UNet's input channels beyond the latent's (INPUT_KINDS)."""
    extra = unet.in_channels - vae.z_channels
    kinds = {k.channels: k for k in INPUT_KINDS.values()}
    if extra not in kinds:
        known = ", ".join(f"{vae.z_channels + k.channels} ({k.variant})" for k in INPUT_KINDS.values())
        raise CheckpointError(f"UNet has {unet.in_channels} input channels; known are {known}")
    return kinds[extra]


def unused_keys(key: str, cfg: ModelConfig) -> bool:
    """Keys that real checkpoints carry but inference never uses (training state, unused heads)."""
    # low_scale_model.*: the upscaler's augmentation schedule as buffers; LowResConfig recomputes it.
    # depth_model.*: the depth model's DPT estimator, loaded on its own when depth2img needs it.
    if key.startswith(("model_ema.", "first_stage_model.loss.", "cond_stage_model.model.visual.", "low_scale_model.",
                       "depth_model.")):
        return True
    if key in _TRAINING_BUFFERS or key.endswith("embeddings.position_ids"):
        return True
    if key in (OPENCLIP + "text_projection", OPENCLIP + "logit_scale", OPENCLIP + "attn_mask"):
        return True
    m = re.match(re.escape(OPENCLIP) + r"transformer\.resblocks\.(\d+)\.", key)
    return bool(m) and int(m.group(1)) >= cfg.text.layers


# DDPM buffers that LDM training saves next to the networks; we recompute the schedule.
_TRAINING_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "model_ema.decay", "model_ema.num_updates",
}

