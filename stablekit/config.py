"""Frozen configuration dataclasses for the three networks, and the named presets.

A config describes shapes only; weights come from `checkpoint.py`. The presets are the
real Stable Diffusion sizes; `checkpoint.detect()` builds configs for any size from the
tensor shapes of a checkpoint and uses the presets' naming only for reporting.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

Family = Literal["sd1", "sd2"]
Prediction = Literal["eps", "v"]
ExtraInputs = Literal["none", "inpaint", "depth", "lowres"]


@dataclass(frozen=True)
class InputKind:
    """What a model kind feeds the UNet besides the noisy latent, read off its input channels."""

    name: ExtraInputs
    channels: int  # extra input channels after the latent's
    variant: str  # what `stablekit info` calls it
    suffix: str  # model names: sd1-inpainting, sd2-depth
    what: str  # for messages


INPUT_KINDS: dict[str, InputKind] = {k.name: k for k in (
    InputKind("none", 0, "base", "", "a base model"),
    InputKind("inpaint", 5, "inpaint", "-inpainting", "an inpainting model (mask + masked-picture latent)"),
    InputKind("depth", 1, "depth", "-depth", "a depth model (depth map)"),
    InputKind("lowres", 3, "upscaler", "-x4-upscaler", "an upscaler (low-resolution picture)"),
)}

# The web UI's "Approx cheap" latent -> RGB map for SD 1.x / 2.x latents: [4 latent channels][3 colours].
SD_PREVIEW_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text tower. `layout` picks the checkpoint key layout (and the activation)."""

    layout: Literal["clip", "openclip"] = "clip"  # SD 1.x transformers CLIP, SD 2.x OpenCLIP
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12  # blocks that are computed (SD 2 files carry one more, never used)
    heads: int = 12
    mlp_width: int = 3072
    max_positions: int = 77

    @property
    def activation(self) -> str:
        return "quick_gelu" if self.layout == "clip" else "gelu"

    @property
    def pad_id(self) -> int:
        # SD 1 pads with <|endoftext|> (transformers' tokenizer), SD 2 with 0 (open_clip).
        return 49407 if self.layout == "clip" else 0


@dataclass(frozen=True)
class UNetConfig:
    """The LDM `openaimodel.UNetModel` as Stable Diffusion configures it."""

    in_channels: int = 4  # 4 base, 9 inpainting (noisy latent + mask + masked-image latent)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels (0 = full latent size) with transformers
    num_heads: int = 8  # SD 1: fixed head count ...
    num_head_channels: int = -1  # ... SD 2: fixed 64 channels per head (then num_heads = -1)
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD 2: Linear proj_in/out instead of 1x1 conv
    norm_groups: int = 32  # GroupNorm groups (diffusers' norm_num_groups); small models need fewer
    # The optional vector input added to the time embedding (LDM `label_emb`): class labels through an
    # embedding table (num_classes, e.g. the x4 upscaler's noise level) or a float vector through two
    # linear layers (adm_in_channels, LDM num_classes="sequential", e.g. SDXL's pooled text + sizes).
    num_classes: int = 0
    adm_in_channels: int = 0
    # Levels whose transformers' first attention attends to the text context instead of to the image
    # tokens (LDM `disable_self_attentions` by level, diffusers `only_cross_attention` by down block;
    # the x4 upscaler: levels 1 and 2). The middle block always keeps self-attention.
    cross_only_levels: tuple[int, ...] = ()

    def heads_for(self, channels: int) -> int:
        if self.num_head_channels > 0:
            if channels % self.num_head_channels:
                raise ValueError(f"{channels} channels do not split into heads of {self.num_head_channels}")
            return channels // self.num_head_channels
        return self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """The KL autoencoder (`first_stage_model`)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    norm_groups: int = 32  # GroupNorm groups (diffusers' norm_num_groups)
    # The latent format: the sampler's latent is (VAE latent - shift_factor) * scale_factor, and
    # preview_rgb (and preview_bias) map it to colours for cheap live previews; a format
    # that is not SD's gets a fitted map or decoder previews at load (models/preview_fit.py).
    scale_factor: float = 0.18215
    shift_factor: float = 0.0
    preview_rgb: tuple[tuple[float, float, float], ...] = SD_PREVIEW_RGB
    preview_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)  # added after the map (fitted formats have one)
    preview_decoder: bool = False  # preview with the decoder itself (small VAEs of other latent formats)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class ScheduleConfig:
    """The discrete DDPM noise schedule the model was trained with (scaled_linear betas)."""

    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    zero_terminal_snr: bool = False  # betas rescaled so the last step is pure noise (Lin et al. 2023)


@dataclass(frozen=True)
class LowResConfig:
    """The x4 upscaler's noise augmentation of its low-resolution input picture (LDM
    `ImageConcatWithNoiseAugmentation`): x_aug = sqrt(a[t]) x + sqrt(1 - a[t]) noise at t = noise level,
    with a[t] the cumulative alphas of its own scaled_linear schedule (pixel space, not the latent's)."""

    max_noise_level: int = 350  # the largest noise level (class label) the UNet was trained with
    linear_start: float = 1e-4
    linear_end: float = 2e-2
    timesteps: int = 1000


@dataclass(frozen=True)
class ModelConfig:
    family: Family
    inputs: ExtraInputs  # extra UNet input channels (INPUT_KINDS), set by detection from the UNet's
    prediction: Prediction
    text: TextEncoderConfig
    unet: UNetConfig
    vae: VAEConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    resolution: int = 512  # the picture size it was trained at: the default width and height
    lowres: LowResConfig | None = None  # the upscaler's low-res input augmentation (inputs "lowres" only)

    @property
    def kind(self) -> InputKind:
        return INPUT_KINDS[self.inputs]

    @property
    def variant(self) -> str:
        return self.kind.variant

    @property
    def name(self) -> str:
        v = "-v" if self.prediction == "v" else ""
        return f"{self.family}{self.kind.suffix}{v}"


SD1_TEXT = TextEncoderConfig()
SD2_TEXT = TextEncoderConfig(layout="openclip", width=1024, layers=23, heads=16, mlp_width=4096)
SD1_UNET = UNetConfig()
SD2_UNET = UNetConfig(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)

PRESETS: dict[str, ModelConfig] = {
    "sd1": ModelConfig("sd1", "none", "eps", SD1_TEXT, SD1_UNET, VAEConfig()),
    "sd1-inpainting": ModelConfig("sd1", "inpaint", "eps", SD1_TEXT, replace(SD1_UNET, in_channels=9), VAEConfig()),
    "sd2": ModelConfig("sd2", "none", "eps", SD2_TEXT, SD2_UNET, VAEConfig()),
    "sd2-v": ModelConfig("sd2", "none", "v", SD2_TEXT, SD2_UNET, VAEConfig()),
    "sd2-inpainting": ModelConfig("sd2", "inpaint", "eps", SD2_TEXT, replace(SD2_UNET, in_channels=9), VAEConfig()),
    # Stability-AI/stablediffusion configs/stable-diffusion/x4-upscaling.yaml: parameterization v, linear_start
    # 1e-4 / linear_end 2e-2, scale_factor 0.08333, UNet in_channels 7 (4 latent + 3 RGB), model_channels 256,
    # channel_mult [1,2,2,4], attention_resolutions [2,4,8], num_heads 8, num_classes 1000 (the noise level),
    # disable_self_attentions [T,T,T,F] (level 0 has no attention), VAE ch_mult [1,2,4] (f = 4), and
    # low_scale_config: max_noise_level 350 on linear 1e-4..2e-2. Detection fills an upscaler's gaps from it.
    "sd2-x4-upscaler-v": ModelConfig(
        "sd2", "lowres", "v", SD2_TEXT,
        replace(SD2_UNET, in_channels=7, model_channels=256, channel_mult=(1, 2, 2, 4), attention_levels=(1, 2, 3),
                num_heads=8, num_head_channels=-1, num_classes=1000, cross_only_levels=(1, 2)),
        VAEConfig(ch_mult=(1, 2, 4), scale_factor=0.08333),
        ScheduleConfig(linear_start=1e-4, linear_end=2e-2), lowres=LowResConfig(),
    ),
}
