"""Live previews without the VAE: latent -> RGB by a fixed linear map.

The coefficients are the loaded model's latent format's (`VAEConfig.preview_rgb` and `preview_bias`:
the web UI's "Approx cheap" map for the SD 1.x / 2.x latent space, or one fitted from the model's VAE
at load for other formats), applied to the scaled latent the
sampler works on. One small matrix product per preview instead of a decoder pass: cheap enough
to run on every progress request.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..config import SD_PREVIEW_RGB, VAEConfig
from ..images import to_pil
from ..models import StableDiffusionModel
from ..pipeline.steps import vae_decode

LATENT_RGB = torch.tensor(SD_PREVIEW_RGB)  # [4 latent channels, 3 colours]


def latent_preview(latent: torch.Tensor, scale: int = 1, rgb_map: Sequence[Sequence[float]] = SD_PREVIEW_RGB,
                   bias: Sequence[float] = (0.0, 0.0, 0.0)) -> Image.Image:
    """latent [C, h, w] (or [1, C, h, w]) -> an RGB picture of h x w (times `scale`, nearest).

    `rgb_map` [C][3] and `bias` [3]: the latent format's affine map to colours.
    """
    matrix = torch.tensor(rgb_map, dtype=torch.float32)
    x = latent.detach().float().cpu().reshape(-1, *latent.shape[-2:])[: matrix.shape[0]]  # [C, h, w]
    rgb = torch.einsum("chw,cr->hwr", x, matrix) + torch.tensor(bias, dtype=torch.float32)  # roughly [-1, 1]
    arr = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    image = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image


@dataclass
class Previewer:
    """Pictures of latents in one model's latent format: its map, or its small decoder (`vae`)."""

    cfg: VAEConfig
    vae: torch.nn.Module | None = None  # only for a format previewed through its own decoder

    def __call__(self, latent: torch.Tensor) -> Image.Image:
        """latent [C, h, w] -> a picture."""
        if self.vae is None:
            return latent_preview(latent, rgb_map=self.cfg.preview_rgb, bias=self.cfg.preview_bias)
        with torch.no_grad():
            return to_pil(vae_decode(self.vae, latent.reshape(-1, *latent.shape[-3:])[:1]))[0]


def model_previewer(model: StableDiffusionModel, cfg: VAEConfig) -> Previewer:
    return Previewer(cfg, model.vae if cfg.preview_decoder else None)


def model_preview(latent: torch.Tensor, model: StableDiffusionModel, cfg: VAEConfig) -> Image.Image:
    """A picture of a latent [C, h, w] in the model's latent format."""
    return model_previewer(model, cfg)(latent)


def png_base64(image: Image.Image, parameters: str | None = None) -> str:
    """A picture as base64 PNG text, with the infotext in the `parameters` chunk when given."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    if parameters:
        meta.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode("ascii")
