"""Pictures sent by clients: base64 (optionally a data URL) or, when enabled, an http(s) URL.

Sizes are checked before decoding: the base64 text length, then the width x height from the
picture's header, before its pixels are read (a small PNG can claim a huge size).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image

from .config import Limits
from .errors import ApiError
from .security import fetch_url


def _bytes_of(data: str, limits: Limits, allow_urls: bool, what: str) -> bytes:
    text = data.strip()
    if text.startswith(("http://", "https://")):
        if not allow_urls:
            raise ApiError(400, f"{what}: fetching pictures from URLs is disabled on this server "
                                "(start it with --allow-url-images)")
        return fetch_url(text, limits.max_upload_bytes)
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise ApiError(400, f"{what}: a data URL must be base64-encoded (data:image/png;base64,...)")
    if len(text) > limits.max_upload_bytes * 4 // 3 + 4:
        raise ApiError(413, f"{what}: picture over {limits.max_upload_bytes} bytes")
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{what}: not valid base64") from None


def decode_picture(data: str, limits: Limits, allow_urls: bool, what: str = "image", mode: str | None = "RGB") -> Image.Image:
    """One client picture -> a loaded PIL image (converted to `mode` unless None)."""
    if not isinstance(data, str) or not data.strip():
        raise ApiError(400, f"{what}: empty picture")
    raw = _bytes_of(data, limits, allow_urls, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))  # reads the header only
            w, h = image.size
            if w * h > limits.max_input_pixels:
                raise ApiError(413, f"{what}: {w}x{h} pictures are over this server's limit of "
                                    f"{limits.max_input_pixels} pixels")
            image.load()
    except ApiError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning, SyntaxError) as e:
        raise ApiError(400, f"{what}: not a readable picture ({e})") from None
    if mode is None:
        return image
    if mode == "RGB" and image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))  # the web UI flattens onto white
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert(mode)
