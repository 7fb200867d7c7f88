"""What each model kind needs to be conditioned: text -> Cond, the extra input channels, guidance.

Text: the prompts go through the tokenizer (the prompt parser's place) and the text encoder into
the cross-attention tokens. Extra input channels are keyed by the model's kind (INPUT_KINDS, read
off the UNet's input channels by detection); a task hands over the pictures a kind needs and gets
the concat tensor back, so no task tests the kind itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import torch

from ..addons.embeddings import Embedding
from ..diffusion.denoiser import CFGDenoiser, ModelDenoiser, UNetFn
from ..diffusion.schedule import ModelSchedule
from ..masks import latent_mask
from ..models import StableDiffusionModel
from ..models.tokenizer import CLIPTokenizer
from ..params import GenerationParams
from .control import Control, ControlledUNet, control_inputs
from .depth import DepthEstimator, depth_for_latents
from .steps import SamplingPlan, encode_picture
from .text import TextSettings, encode_prompt, encode_texts, prompt_text


@dataclass
class TaskContext:
    """What a task needs from the engine: networks, tokenizer, schedule and numeric settings."""

    model: StableDiffusionModel
    tokenizer: CLIPTokenizer
    schedule: ModelSchedule
    device: torch.device
    dtype: torch.dtype
    quantize_timesteps: bool = False
    embeddings: Mapping[str, Embedding] = field(default_factory=dict)  # textual inversion, by trigger word
    notes: dict[str, object] = field(default_factory=dict)  # infotext fields a job adds (a per-job copy)
    # An SD x4 upscaler for the "x4" hires upscaler: (pictures [B, 3, h, w] in [0, 1], prompt, seed)
    # -> [B, 3, 4h, 4w].
    upscaler: Callable[[torch.Tensor, str, int], torch.Tensor] | None = None
    # The depth estimator for a depth model: from a folder (its path) or, with None, the checkpoint's own.
    depth_estimator: Callable[[str | None], DepthEstimator] | None = None
    controls: tuple[Control, ...] = ()  # this job's ControlNets (prepared by the engine)

    def denoiser(self, unet: UNetFn | None = None) -> ModelDenoiser:
        """The model's denoiser; `unet` replaces the network call (a wrapper of it: tiling, ControlNet)."""
        cfg = self.model.cfg
        return ModelDenoiser(unet or self.model.unet, self.schedule, cfg.prediction, self.dtype,
                             self.quantize_timesteps)

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        vae = self.model.vae.cfg
        return vae.z_channels, height // vae.downscale, width // vae.downscale


@torch.inference_mode()
def encode_text(ctx: TaskContext, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
    """Plain prompts (B) -> cross-attention tokens [B, 77 * chunks, C] in the model's dtype."""
    return encode_texts(ctx, prompts, TextSettings(clip_skip, embeddings=ctx.embeddings))


# --- extra input channels, by model kind -----------------------------------------------------------


@dataclass(frozen=True)
class Pictures:
    """What a task can offer the extra-input builders, at the working size."""

    picture: torch.Tensor | None = None  # [1, 3, H, W] in [0, 1]
    mask: torch.Tensor | None = None  # [1, 1, H, W], 1 = repaint (may be soft)
    mask_strength: float = 1.0  # inpainting models: how much of the masked picture is hidden
    depth: torch.Tensor | None = None  # [1, 1, h, w] any size, larger = nearer (MiDaS inverse depth)


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


def _depth_channel(ctx: TaskContext, given: Pictures) -> torch.Tensor:
    """Channel 5 of a depth model: the depth map resized straight to the latent size (bicubic) and
    min-max normalised to [-1, 1], the same for both CFG halves (diffusers' depth2img, LDM 'hybrid')."""
    if given.depth is None:
        raise ValueError("a depth model needs a depth map or a depth estimator: use depth2img")
    _, h, w = ctx.latent_shape(given.picture.shape[-1], given.picture.shape[-2])
    return depth_for_latents(given.depth, (h, w)).to(ctx.device)


ExtraInputBuilder = Callable[[TaskContext, Pictures], torch.Tensor]
EXTRA_INPUTS: dict[str, ExtraInputBuilder] = {"inpaint": _inpaint_channels, "depth": _depth_channel}  # "none": none


def extra_inputs(ctx: TaskContext, given: Pictures, batch: int) -> torch.Tensor | None:
    """The concat channels [B, c, h, w] the loaded model's kind needs, or None for a base model."""
    kind = ctx.model.cfg.inputs
    if kind == "none":
        return None
    if kind not in EXTRA_INPUTS:
        raise ValueError(f"this is {ctx.model.cfg.kind.what}; no task here gives it its input channels yet")
    return EXTRA_INPUTS[kind](ctx, given).expand(batch, -1, -1, -1)


def denoiser_calls(p: GenerationParams) -> int:
    """Denoiser evaluations of a run: twice the steps for second-order samplers, as the web UI counts."""
    return p.steps * (2 if p.sampler_spec.second_order else 1)


def guided_denoiser(ctx: TaskContext, p: GenerationParams, plan: SamplingPlan, concat: torch.Tensor | None = None,
                    vector: torch.Tensor | None = None, unet: UNetFn | None = None,
                    after: int | None = None) -> CFGDenoiser:
    """The prompt-guided denoiser for `plan`: prompt and negative prompt as CondSchedules sharing the
    extra channels, the vector input and the job's ControlNet maps (at p's size, acting in their step
    windows of the plan); `unet` wraps the network call where a task needs it (tiling).

    Only the prompt's extra-network tags are cut out (the web UI leaves the negative prompt as it is).
    Prompt-editing schedules count denoiser calls (denoiser_calls); `after`: the calls of the pass this
    one continues (the hires fix's second pass, where controls follow their hires option), as the web
    UI's hires conditioning does.
    """
    settings = TextSettings(p.clip_skip, p.emphasis, ctx.embeddings)
    calls = denoiser_calls(p)
    cond, used = encode_prompt(ctx, prompt_text(p.prompt), p.batch_size, calls, settings, concat, vector, after)
    uncond, used_negative = encode_prompt(ctx, p.negative_prompt, p.batch_size, calls, settings, concat, vector,
                                          after)
    used.update(used_negative)
    if used:
        ctx.notes["TI hashes"] = ", ".join(f"{name}: {emb.hash}" for name, emb in used.items())
    if ctx.controls:
        if unet is not None:
            raise ValueError("ControlNet does not run on this task (its UNet call is wrapped: tiled upscaling)")
        positive, negative = control_inputs(ctx.controls, p.width, p.height, p.batch_size, plan.clock, ctx.device,
                                            second_pass=after is not None)
        cond = cond.map(lambda c: replace(c, control=positive))
        uncond = uncond.map(lambda c: replace(c, control=negative))
        unet = ControlledUNet(ctx.model.unet)
    return CFGDenoiser(ctx.denoiser(unet), cond, uncond, p.cfg_scale, rescale=p.guidance_rescale)
