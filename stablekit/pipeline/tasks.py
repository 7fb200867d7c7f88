"""Tasks: short compositions of the shared steps. Each returns float pictures [B, 3, H, W] in [0, 1]."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..diffusion.brownian import brownian_noise
from ..diffusion.denoiser import CFGDenoiser, Denoise, MaskedDenoiser, ModelDenoiser, SoftMaskedDenoiser
from ..diffusion.samplers import Callback
from ..diffusion.schedule import ModelSchedule, make_sigmas
from ..masks import fill_hole, latent_mask
from ..models import StableDiffusionModel
from ..models.tokenizer import CLIPTokenizer
from ..params import GenerationParams
from .steps import decode, denoise, encode_picture, encode_prompt, generators_for, initial_noise


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
        unet = self.model.unet
        return ModelDenoiser(unet, self.schedule, self.model.cfg.prediction, self.dtype, self.quantize_timesteps)


def sampler_sigmas(schedule: ModelSchedule, p: GenerationParams) -> torch.Tensor:
    """The schedule the sampler walks: `steps` steps, or steps+1 less the next-to-last where the spec says."""
    if p.sampler_spec.discard_penultimate_sigma:
        sigmas = make_sigmas(schedule, p.schedule_name, p.steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return make_sigmas(schedule, p.schedule_name, p.steps)


def _guided(ctx: TaskContext, p: GenerationParams, concat: torch.Tensor | None = None) -> CFGDenoiser:
    """The prompt-guided denoiser; `concat` holds extra input channels (inpainting models)."""
    cond = encode_prompt(ctx.model, ctx.tokenizer, [p.prompt] * p.batch_size, p.clip_skip)
    uncond = encode_prompt(ctx.model, ctx.tokenizer, [p.negative_prompt] * p.batch_size, p.clip_skip)
    return CFGDenoiser(ctx.denoiser(), cond, uncond, p.cfg_scale, concat=concat, rescale=p.guidance_rescale)


def _noise(
    ctx: TaskContext, p: GenerationParams, noise: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Per-image generators and the initial noise [B, 4, H/8, W/8] (explicit noise replaces the seeded draw)."""
    down = ctx.model.vae.cfg.downscale
    shape = (ctx.model.vae.cfg.z_channels, p.height // down, p.width // down)
    generators = generators_for([p.seed + i for i in range(p.batch_size)])
    seeded = initial_noise(generators, shape)
    if noise is not None:
        if tuple(noise.shape) != (p.batch_size, *shape):
            raise ValueError(f"explicit noise has shape {tuple(noise.shape)}, expected {(p.batch_size, *shape)}")
        seeded = noise.float()
    return seeded.to(ctx.device), generators


def _sample(
    ctx: TaskContext, p: GenerationParams, denoiser: Denoise, noise: torch.Tensor,
    generators: list[torch.Generator], sigmas: torch.Tensor, callback: Callback | None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    seeds = [p.seed + i for i in range(p.batch_size)]
    options = p.sampler_options()
    full = sampler_sigmas(ctx.schedule, p)
    if "seeds" in p.sampler_spec.inputs and len(sigmas) < len(full):
        # img2img runs the tail of the schedule; the web UI's Brownian tree still spans all of it.
        options["noise_sampler"] = brownian_noise(noise, full, seeds)
    return denoise(
        denoiser, noise, sigmas, p.sampler_spec, generators, start=start, callback=callback,
        options=options, inputs={"model_schedule": ctx.schedule, "seeds": seeds},
    )


def txt2img(
    ctx: TaskContext,
    p: GenerationParams,
    *,
    noise: torch.Tensor | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Text to picture. `p` must be validated; `noise` [B, 4, H/8, W/8] replaces the seeded noise."""
    if ctx.model.cfg.variant != "base":
        raise ValueError(f"txt2img needs a base model; this is an {ctx.model.cfg.variant} model")
    seeded, generators = _noise(ctx, p, noise)
    sigmas = sampler_sigmas(ctx.schedule, p)
    latents = _sample(ctx, p, _guided(ctx, p), seeded, generators, sigmas, callback)
    return decode(ctx.model, latents)


def img2img(
    ctx: TaskContext,
    p: GenerationParams,
    picture: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Picture [1, 3, H, W] in [0, 1] (already at the target size) to picture.

    The schedule is built for `steps` steps and only its last int(steps * strength) steps run
    (at least one), from the picture's latent noised to that point, as diffusers and the web UI do.
    """
    if ctx.model.cfg.variant != "base":
        raise ValueError(f"img2img needs a base model; this is an {ctx.model.cfg.variant} model")
    if tuple(picture.shape[-2:]) != (p.height, p.width):
        raise ValueError(f"picture is {picture.shape[-1]}x{picture.shape[-2]}, expected {p.width}x{p.height}")
    pictures = picture.expand(p.batch_size, -1, -1, -1)
    if p.denoising_strength == 0:
        return pictures.clone()
    seeded, generators = _noise(ctx, p, noise)
    run = max(1, int(p.steps * p.denoising_strength))
    sigmas = sampler_sigmas(ctx.schedule, p)[-(run + 1):]
    latents = encode_picture(ctx.model, pictures)
    latents = _sample(ctx, p, _guided(ctx, p), seeded, generators, sigmas, callback, start=latents)
    return decode(ctx.model, latents)


def inpaint(
    ctx: TaskContext,
    p: GenerationParams,
    picture: torch.Tensor,
    mask: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Repaint where `mask` [1, 1, H, W] (1 = repaint, may be soft) is set, in picture [1, 3, H, W].

    Two methods: "blend" runs any model and keeps the x0 estimate outside the mask equal to the
    original latent; "model" gives a 9-channel inpainting model the mask and the masked picture's
    latent as extra input channels. Returns the decoded pictures before paste-back.
    """
    is_inpaint_model = ctx.model.cfg.variant == "inpaint"
    method = p.inpaint_method if p.inpaint_method != "auto" else ("model" if is_inpaint_model else "blend")
    if method == "model" and not is_inpaint_model:
        raise ValueError("inpainting method 'model' needs a 9-channel inpainting checkpoint; use 'blend'")
    if tuple(mask.shape[-2:]) != tuple(picture.shape[-2:]):
        raise ValueError(f"mask is {mask.shape[-1]}x{mask.shape[-2]}, picture is {picture.shape[-1]}x{picture.shape[-2]}")
    if p.denoising_strength == 0:  # nothing to repaint
        return picture.expand(p.batch_size, -1, -1, -1).clone()
    hard = (mask >= 0.5).float()  # pixel-space decisions use the binarised mask, as diffusers does
    source = fill_hole(picture, hard) if p.masked_content == "fill" else picture
    seeded, generators = _noise(ctx, p, noise)
    original = encode_picture(ctx.model, source).expand(p.batch_size, -1, -1, -1)
    lmask = latent_mask(mask, original.shape[-2:]).to(original.device)  # [1, 1, h, w], 1 = repaint
    start = original
    if p.masked_content == "latent-noise":  # the web UI reuses the seed's noise here
        start = original * (1 - lmask) + seeded * lmask
    elif p.masked_content == "latent-nothing":
        start = original * (1 - lmask)

    concat = None
    if is_inpaint_model:  # channels 5..9: mask, then the latent of the picture with the hole greyed out
        hidden = picture * (1 - hard) + 0.5 * hard
        conditioning = torch.lerp(picture, hidden, p.mask_strength)
        concat = torch.cat([lmask.expand(p.batch_size, -1, -1, -1),
                            encode_picture(ctx.model, conditioning).expand(p.batch_size, -1, -1, -1)], dim=1)
    denoiser: Denoise = _guided(ctx, p, concat)
    full = sampler_sigmas(ctx.schedule, p)
    if p.soft_inpainting:  # per-pixel strength: the soft mask at latent size times the overall strength
        lmask = F.interpolate(mask, size=original.shape[-2:], mode="area").to(original.device) * p.denoising_strength
        denoiser = SoftMaskedDenoiser(denoiser, original, lmask, full)
    elif method == "blend":
        denoiser = MaskedDenoiser(denoiser, original, lmask)

    run = max(1, int(p.steps * p.denoising_strength))
    sigmas = full[-(run + 1):]
    if p.denoising_strength == 1 and not p.soft_inpainting:
        # Full strength: the hole starts from pure noise, as diffusers does. With blending, the rest
        # starts where the blend keeps it, on the original's trajectory (x = x0 + sigma * noise).
        if method == "blend":
            sigma0 = float(sigmas[0])
            extra = p.sampler_spec.initial_noise_scale(sigma0) - sigma0  # DDIM-style samplers start wider
            start = original * (1 - lmask) + seeded * extra * lmask
        else:
            start = None
    latents = _sample(ctx, p, denoiser, seeded, generators, sigmas, callback, start=start)
    if p.soft_inpainting:  # pixels of strength 0 never joined: exactly the original
        latents = torch.where(lmask > 0, latents, original)
    elif method == "blend":  # the last step lands on the original outside the mask
        latents = latents * lmask + original * (1 - lmask)
    return decode(ctx.model, latents)
