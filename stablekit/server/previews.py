"""Live previews without the VAE: latent -> RGB by a fixed linear map.

The coefficients are the web UI's "Approx cheap" map for the SD 1.x / 2.x latent space (both use
the same VAE), applied to the scaled latent the sampler works on. One small matrix product per
preview instead of a decoder pass: cheap enough to run on every progress request.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

LATENT_RGB = torch.tensor([  # [4 latent channels, 3 colours]
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])


def latent_preview(latent: torch.Tensor, scale: int = 1) -> Image.Image:
    """latent [4, h, w] (or [1, 4, h, w]) -> an RGB picture of h x w (times `scale`, nearest)."""
    x = latent.detach().float().cpu().reshape(-1, *latent.shape[-2:])[:4]  # [4, h, w]
    rgb = torch.einsum("chw,cr->hwr", x, LATENT_RGB)  # roughly [-1, 1]
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
