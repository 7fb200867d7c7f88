"""Live previews without the VAE: latent -> RGB by a fixed linear map.

The coefficients are the loaded model's latent format's (`VAEConfig.preview_rgb`; by default the
web UI's "Approx cheap" map for the SD 1.x / 2.x latent space), applied to the scaled latent the
sampler works on. One small matrix product per preview instead of a decoder pass: cheap enough
to run on every progress request.
"""

from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..config import SD_PREVIEW_RGB

LATENT_RGB = torch.tensor(SD_PREVIEW_RGB)  # [4 latent channels, 3 colours]


def latent_preview(latent: torch.Tensor, scale: int = 1, rgb_map: Sequence[Sequence[float]] = SD_PREVIEW_RGB,
                   ) -> Image.Image:
    """latent [C, h, w] (or [1, C, h, w]) -> an RGB picture of h x w (times `scale`, nearest).

    `rgb_map` [C][3]: the latent format's linear map to colours.
    """
    matrix = torch.tensor(rgb_map, dtype=torch.float32)
    x = latent.detach().float().cpu().reshape(-1, *latent.shape[-2:])[: matrix.shape[0]]  # [C, h, w]
    rgb = torch.einsum("chw,cr->hwr", x, matrix)  # roughly [-1, 1]
    arr = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    image = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image


def png_base64(image: Image.Image, parameters: str | None = None) -> str:
    """A picture as base64 PNG text, with the infotext in the `parameters` chunk when given."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    if parameters:
        meta.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode("ascii")
