"""What each model kind needs to be conditioned: text -> Cond, the extra input channels, guidance.

Text: the prompts go through the tokenizer (the prompt parser's place) and the text encoder into
the cross-attention tokens. Extra input channels are keyed by the model's kind (INPUT_KINDS, read
off the UNet's input channels by detection); a task hands over the pictures a kind needs and gets
the concat tensor back, so no task tests the kind itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..diffusion.cond import Cond
from ..diffusion.denoiser import CFGDenoiser, ModelDenoiser
from ..diffusion.schedule import ModelSchedule
from ..masks import latent_mask
from ..models import StableDiffusionModel
from ..models.tokenizer import CLIPTokenizer
from ..params import GenerationParams
from .steps import encode_picture


@dataclass
class TaskContext:
    """What a task needs from the engine: networks, tokenizer, schedule and numeric settings."""

    model: StableDiffusionModel
    tokenizer: CLIPTokenizer
    schedule: ModelSchedule
    device: torch.device
    dtype: torch.dtype
    quantize_timesteps: bool = False

    def denoiser(self) -> ModelDenoiser:
        cfg = self.model.cfg
        return ModelDenoiser(self.model.unet, self.schedule, cfg.prediction, self.dtype, self.quantize_timesteps)

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        vae = self.model.vae.cfg
        return vae.z_channels, height // vae.downscale, width // vae.downscale


@torch.inference_mode()
def encode_text(ctx: TaskContext, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
    """prompts (B) -> cross-attention tokens [B, 77, C] in the model's dtype. Tokens past 75 are dropped."""
    device = next(ctx.model.text_encoder.parameters()).device
    ids = ctx.tokenizer(prompts).to(device)  # [B, 77]
    return ctx.model.text_encoder(ids, clip_skip=clip_skip)


# --- extra input channels, by model kind -----------------------------------------------------------


@dataclass(frozen=True)
class Pictures:
    """What a task can offer the extra-input builders, at the working size."""

    picture: torch.Tensor | None = None  # [1, 3, H, W] in [0, 1]
    mask: torch.Tensor | None = None  # [1, 1, H, W], 1 = repaint (may be soft)
    mask_strength: float = 1.0  # inpainting models: how much of the masked picture is hidden


def _inpaint_channels(ctx: TaskContext, given: Pictures) -> torch.Tensor:
    """Channels 5..9 of an inpainting model: the latent-size mask, then the latent of the picture
    with the hole greyed out (lerped by the mask strength, the web UI's inpainting_mask_weight)."""
    if given.picture is None or given.mask is None:
        raise ValueError("an inpainting model needs a picture and a mask: use inpaint")
    hard = (given.mask >= 0.5).float()  # pixel-space decisions use the binarised mask, as diffusers does
    hidden = given.picture * (1 - hard) + 0.5 * hard
    conditioning = torch.lerp(given.picture, hidden, given.mask_strength)
    masked = encode_picture(ctx.model, conditioning)
    return torch.cat([latent_mask(given.mask, masked.shape[-2:]).to(masked.device), masked], dim=1)


ExtraInputBuilder = Callable[[TaskContext, Pictures], torch.Tensor]
EXTRA_INPUTS: dict[str, ExtraInputBuilder] = {"inpaint": _inpaint_channels}  # "none": no channels


def extra_inputs(ctx: TaskContext, given: Pictures, batch: int) -> torch.Tensor | None:
    """The concat channels [B, c, h, w] the loaded model's kind needs, or None for a base model."""
    kind = ctx.model.cfg.inputs
    if kind == "none":
        return None
    if kind not in EXTRA_INPUTS:
        raise ValueError(f"this is {ctx.model.cfg.kind.what}; no task here gives it its input channels yet")
    return EXTRA_INPUTS[kind](ctx, given).expand(batch, -1, -1, -1)


def guided_denoiser(ctx: TaskContext, p: GenerationParams, concat: torch.Tensor | None = None) -> CFGDenoiser:
    """The prompt-guided denoiser: prompt and negative prompt as two Conds sharing the extra channels."""
    text = encode_text(ctx, [p.prompt] * p.batch_size, p.clip_skip)
    negative = encode_text(ctx, [p.negative_prompt] * p.batch_size, p.clip_skip)
    cond, uncond = Cond(text, concat=concat), Cond(negative, concat=concat)
    return CFGDenoiser(ctx.denoiser(), cond, uncond, p.cfg_scale, rescale=p.guidance_rescale)
