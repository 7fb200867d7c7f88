"""Hires fix: txt2img's first-pass latents enlarged, then refined by an img2img pass at the new size.

The web UI's semantics (`StableDiffusionProcessingTxt2Img.sample_hr_pass`): the target size is the
first pass's times the scale, or the given resize (one side 0 keeps the aspect; both given: cover the
box, then crop the latent's middle). Latent upscalers interpolate the latent; the others decode,
resize the picture and encode it again. The second pass runs exactly its steps on the tail of a
schedule of int(steps / denoise) steps, and its noise is each image's first draw at the new shape
(fresh generators, as the web UI makes a new ImageRNG for it), so a seed gives the web UI's picture.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..diffusion.common import Callback
from ..params import HIRES_UPSCALERS, GenerationParams
from ..prompts import extract_networks
from .conditioning import TaskContext, denoiser_calls, guided_denoiser
from .text import prompt_text
from .steps import decode, denoise, encode_picture, plan_sampling

# The web UI's latent upscale modes: our name -> (interpolation mode, antialias).
LATENT_MODES = {
    "latent": ("bilinear", False), "latent-antialiased": ("bilinear", True), "latent-bicubic": ("bicubic", False),
    "latent-bicubic-antialiased": ("bicubic", True), "latent-nearest": ("nearest", False),
    "latent-nearest-exact": ("nearest-exact", False),
}
# Pixel upscalers without a network: the PIL filter of their enlarging step (then Lanczos to the exact size).
PIXEL_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
                 "none": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class HiresTarget:
    """Where the second pass works: the enlarged size, and the latent cells cropped off its sides."""

    width: int
    height: int
    crop_x: int = 0  # latent columns to cut (half from each side) to reach a requested box
    crop_y: int = 0

    @property
    def final_size(self) -> tuple[int, int]:
        return (self.width // 8 - self.crop_x) * 8, (self.height // 8 - self.crop_y) * 8


def hires_target(p: GenerationParams) -> HiresTarget:
    """The web UI's `calculate_target_resolution` for the first pass's p.width x p.height; a target
    under 8 pixels a side (a latent of nothing) is a clear error."""
    target = _target(p)
    if min(target.final_size) < 8:
        raise ValueError(f"the hires target {target.width}x{target.height} of a {p.width}x{p.height} first pass "
                         "is under 8 pixels a side")
    return target


def work_sizes(p: GenerationParams) -> list[tuple[int, int]]:
    """Every picture size the hires fix works at: the box it enlarges to before cropping, the result,
    and the x4 upscaler's 4x picture (for the server's pixel limit)."""
    target = hires_target(p)
    sizes = [(target.width, target.height), target.final_size]
    return sizes + ([(4 * p.width, 4 * p.height)] if p.hires_upscaler == "x4" else [])


def _target(p: GenerationParams) -> HiresTarget:
    w, h = p.width, p.height
    if p.hires_resize is None:
        return HiresTarget(int(w * p.hires_scale), int(h * p.hires_scale))
    rw, rh = p.hires_resize
    if rh == 0:
        return HiresTarget(rw, rw * h // w)
    if rw == 0:
        return HiresTarget(rh * w // h, rh)
    # Both sides: cover the box keeping the aspect, then crop the latent's middle down to it.
    tw, th = (rw, rw * h // w) if w / h < rw / rh else (rh * w // h, rh)
    return HiresTarget(tw, th, (tw - rw) // 8, (th - rh) // 8)


def second_pass_params(p: GenerationParams, target: HiresTarget) -> GenerationParams:
    """The img2img pass's params: the hires prompt, sampler, schedule and steps where given."""
    width, height = target.final_size
    return replace(
        p, prompt=p.hires_prompt or p.prompt, negative_prompt=p.hires_negative_prompt or p.negative_prompt,
        sampler=p.hires_sampler or p.sampler, scheduler=p.hires_scheduler or p.scheduler,
        steps=p.hires_steps or p.steps, width=width, height=height, denoising_strength=p.hires_denoise,
        hires_scale=None, hires_resize=None,
    )


def enlarge(ctx: TaskContext, p: GenerationParams, latents: torch.Tensor, target: HiresTarget) -> torch.Tensor:
    """First-pass latents [B, 4, h, w] -> latents at the target size, cropped to the box."""
    size = ctx.latent_shape(target.width, target.height)[1:]
    name = p.hires_upscaler
    if name in LATENT_MODES:
        mode, antialias = LATENT_MODES[name]
        big = F.interpolate(latents, size=size, mode=mode, antialias=antialias)
    else:
        pictures = decode(ctx.model, latents)
        f = ctx.model.vae.cfg.downscale
        big = encode_picture(ctx.model, _enlarge_pictures(ctx, p, pictures, size[1] * f, size[0] * f))
    cy, cx = target.crop_y, target.crop_x
    return big[:, :, cy // 2:big.shape[2] - (cy + 1) // 2, cx // 2:big.shape[3] - (cx + 1) // 2]


def _enlarge_pictures(ctx: TaskContext, p: GenerationParams, pictures: torch.Tensor, width: int, height: int,
                      ) -> torch.Tensor:
    """Decoded pictures [B, 3, h, w] in [0, 1] -> [B, 3, height, width], through 8-bit pictures as the web UI."""
    name = p.hires_upscaler
    if name == "x4":  # the SD x4 upscaler, prompted with the second pass's prompt
        if ctx.upscaler is None:
            raise ValueError("the x4 hires upscaler needs an SD x4 upscaler model (--upscaler-model)")
        pictures = ctx.upscaler(pictures, prompt_text(p.hires_prompt or p.prompt), p.seed)  # no LoRA tags
        name = "none"  # then Lanczos to the exact size
    out = []
    for picture in pictures:
        # The web UI truncates (astype uint8), it does not round.
        image = Image.fromarray((255 * picture.permute(1, 2, 0).float().cpu().numpy()).astype(np.uint8))
        if name != "none":  # the upscaler's own step to the scale, then Lanczos to the exact size
            scale = max(width / image.width, height / image.height)
            if scale > 1:
                image = image.resize((int(image.width * scale), int(image.height * scale)), PIXEL_FILTERS[name])
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1))
    return torch.stack(out)


def hires_pass(ctx: TaskContext, p: GenerationParams, latents: torch.Tensor, callback: Callback | None = None,
               ) -> torch.Tensor:
    """The second pass over first-pass latents; denoise 0 returns the enlarged latents as they are."""
    target = hires_target(p)
    start = enlarge(ctx, p, latents, target)
    p2 = second_pass_params(p, target)
    if p.hires_prompt and _lora_tags(p.hires_prompt) != _lora_tags(p.prompt):
        raise ValueError("the hires prompt's <lora:...> tags must be the prompt's: the prompt's LoRAs serve both passes")
    if p2.denoising_strength == 0:
        return start
    plan = plan_sampling(ctx.schedule, p2, ctx.latent_shape(p2.width, p2.height), ctx.device,
                         strength=p2.denoising_strength, fixed_steps=True)
    return denoise(guided_denoiser(ctx, p2, plan, after=denoiser_calls(p)), plan, start=start, callback=callback)


def _lora_tags(prompt: str) -> list[tuple[str, ...]]:
    return sorted(tag.items for tag in extract_networks(prompt)[1] if tag.kind == "lora")


def hires_infotext(p: GenerationParams) -> dict[str, object]:
    """The web UI's hires keys (only with hires fix on)."""
    if not p.hires:
        return {}
    resize = p.hires_resize
    second = replace(p, sampler=p.hires_sampler or p.sampler, scheduler=p.hires_scheduler or p.scheduler)
    return {
        "Denoising strength": p.hires_denoise,
        "Hires upscale": p.hires_scale if resize is None else None,
        "Hires resize": f"{resize[0]}x{resize[1]}" if resize else None,
        "Hires steps": p.hires_steps or None,
        "Hires upscaler": HIRES_UPSCALERS[p.hires_upscaler],
        "Hires sampler": p.hires_sampler if p.hires_sampler not in (None, p.sampler) else None,
        "Hires schedule type": second.schedule_label if second.schedule_label != p.schedule_label else None,
        "Hires prompt": p.hires_prompt if p.hires_prompt not in ("", p.prompt) else None,
        "Hires negative prompt": p.hires_negative_prompt
        if p.hires_negative_prompt not in ("", p.negative_prompt) else None,
    }
