"""Images that cross the wire: PNG or JPEG files in, PNG files out (Pillow).

An uploaded file is checked before its pixels are decoded: its size, its
format (PNG or JPEG only) and its width and height from the header, so a
decompression bomb (a small file that declares a huge image) is refused
without being expanded. Every failure is an ``InvalidArgument`` naming the
request field.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from patchwork.serving.config import Limits
from patchwork.serving.validation import InvalidArgument

FORMATS = ("PNG", "JPEG")


def read_image(data: bytes, field: str, limits: Limits) -> np.ndarray:
    """A PNG or JPEG file -> uint8 RGB pixels (height, width, 3)."""
    if not data:
        raise InvalidArgument(field, "an image is required (PNG or JPEG)")
    if len(data) > limits.max_image_bytes:
        raise InvalidArgument(field, f"{len(data)} bytes is over the limit of {limits.max_image_bytes}")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            if max(width, height) > limits.max_image_side:
                raise InvalidArgument(field, f"{width}x{height} pixels; at most {limits.max_image_side} on a side")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except InvalidArgument:
        raise
    except Image.DecompressionBombError:
        raise InvalidArgument(field, f"declares too many pixels; at most {limits.max_image_side} on a side") from None
    except UnidentifiedImageError:
        raise InvalidArgument(field, "not a PNG or JPEG image") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InvalidArgument(field, f"a damaged image ({e})") from None


def fit(pixels: np.ndarray, size: int) -> np.ndarray:
    """``pixels`` resized (box filter) to size x size, unless already that size."""
    if pixels.shape[:2] == (size, size):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
