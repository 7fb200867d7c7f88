"""Inpainting in latent space, in its parts: the masked-content start, the method, and the sampling.

The methods differ in three places only, so each is a small strategy object:
- blend  (any model): outside the mask the x0 estimate is the original latent (MaskedDenoiser);
- soft:  the mask is a per-pixel denoising strength (SoftMaskedDenoiser);
- model: a 9-channel inpainting model sees the mask and the masked picture as extra channels
         and repaints on its own (no blending).
A 9-channel model gets its extra channels whatever the method (they come with its kind).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..diffusion.denoiser import Denoise, MaskedDenoiser, SoftMaskedDenoiser
from ..diffusion.common import Callback
from ..masks import fill_hole, latent_mask
from ..params import GenerationParams
from .conditioning import Pictures, TaskContext, extra_inputs, guided_denoiser
from .steps import SamplingPlan, denoise, encode_picture, plan_sampling


def masked_start(content: str, original: torch.Tensor, lmask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The latent the masked region starts from (the web UI's "masked content"; fill is done on pixels)."""
    if content == "latent-noise":  # the web UI reuses the seed's noise here
        return original * (1 - lmask) + noise * lmask
    if content == "latent-nothing":
        return original * (1 - lmask)
    return original  # original, fill


@dataclass
class Blend:
    """Blended latents: the unmasked region stays on the original's noise trajectory."""

    original: torch.Tensor  # [B, 4, h, w]
    lmask: torch.Tensor  # [1, 1, h, w] binary, 1 = repaint

    def wrap(self, denoiser: Denoise, plan: SamplingPlan) -> Denoise:
        return MaskedDenoiser(denoiser, self.original, self.lmask)

    def full_strength_start(self, start: torch.Tensor, plan: SamplingPlan) -> torch.Tensor | None:
        # The hole starts from pure noise, as diffusers does; the rest where the blend keeps it
        # (x = x0 + sigma * noise). DDIM-style samplers start wider than sigma, hence the extra.
        sigma0 = float(plan.sigmas[0])
        extra = plan.spec.initial_noise_scale(sigma0) - sigma0
        return self.original * (1 - self.lmask) + plan.noise * extra * self.lmask

    def land(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.lmask + self.original * (1 - self.lmask)  # the last step lands on the original


@dataclass
class Soft:
    """Soft inpainting: per-pixel strength = the soft mask at latent size times the overall strength."""

    original: torch.Tensor
    strength: torch.Tensor  # [1, 1, h, w] in [0, 1]

    def wrap(self, denoiser: Denoise, plan: SamplingPlan) -> Denoise:
        return SoftMaskedDenoiser(denoiser, self.original, self.strength, plan.full)

    def full_strength_start(self, start: torch.Tensor, plan: SamplingPlan) -> torch.Tensor | None:
        return start  # pixels of lower strength must start on the original's trajectory

    def land(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.where(self.strength > 0, latents, self.original)  # strength 0 never joined: the original


class ModelInpaint:
    """A 9-channel model repaints from its extra channels; at full strength it starts from pure noise."""

    def wrap(self, denoiser: Denoise, plan: SamplingPlan) -> Denoise:
        return denoiser

    def full_strength_start(self, start: torch.Tensor, plan: SamplingPlan) -> torch.Tensor | None:
        return None

    def land(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def resolve_method(ctx: TaskContext, p: GenerationParams) -> str:
    """auto -> model for a 9-channel inpainting model, blend otherwise; "model" needs such a model."""
    has_channels = ctx.model.cfg.inputs == "inpaint"
    method = p.inpaint_method if p.inpaint_method != "auto" else ("model" if has_channels else "blend")
    if method == "model" and not has_channels:
        raise ValueError("inpainting method 'model' needs a 9-channel inpainting checkpoint; use 'blend'")
    return method


def inpaint_latents(
    ctx: TaskContext, p: GenerationParams, picture: torch.Tensor, mask: torch.Tensor,
    noise: torch.Tensor | None = None, callback: Callback | None = None,
) -> torch.Tensor:
    """Repaint where `mask` [1, 1, H, W] (1 = repaint, may be soft) is set in picture [1, 3, H, W];
    returns the latents [B, 4, h, w]."""
    method = resolve_method(ctx, p)
    hard = (mask >= 0.5).float()  # pixel-space decisions use the binarised mask, as diffusers does
    source = fill_hole(picture, hard) if p.masked_content == "fill" else picture
    plan = plan_sampling(ctx.schedule, p, ctx.latent_shape(p.width, p.height), ctx.device, noise,
                         p.denoising_strength)
    original = encode_picture(ctx.model, source).expand(p.batch_size, -1, -1, -1)
    lmask = latent_mask(mask, original.shape[-2:]).to(original.device)  # [1, 1, h, w], 1 = repaint
    start = masked_start(p.masked_content, original, lmask, plan.noise)

    concat = extra_inputs(ctx, Pictures(picture, mask, p.mask_strength), p.batch_size)
    if p.soft_inpainting:
        area = F.interpolate(mask, size=original.shape[-2:], mode="area").to(original.device)
        strategy = Soft(original, area * p.denoising_strength)
    else:
        strategy = Blend(original, lmask) if method == "blend" else ModelInpaint()
    denoiser = strategy.wrap(guided_denoiser(ctx, p, plan, concat), plan)
    if p.denoising_strength == 1:
        start = strategy.full_strength_start(start, plan)
    return strategy.land(denoise(denoiser, plan, start=start, callback=callback))
