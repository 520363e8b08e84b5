"""Defensive image loading: every input either becomes an RGB image or a reason.

Handles EXIF rotation, palette / alpha / CMYK / 16-bit modes, animated files (first
frame) and refuses images over a pixel budget before decoding them (decompression
bombs).  Failures raise :class:`ImageError` whose message is the reject reason.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; real photos are far below this


class ImageError(Exception):
    """An image that cannot be used; ``str(error)`` is the reason recorded for it."""


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image, or raise :class:`ImageError` saying why not."""
    path = Path(path)
    if not path.is_file():
        raise ImageError("missing file")
    if path.stat().st_size == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(f"image too large: {w}x{h} pixels (limit {max_pixels})")
                im.seek(0)  # animated GIF/WebP/APNG: the first frame
                im.load()
                return to_rgb(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image: {e}") from None


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on ``background``."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if arr.max(initial=0) > 255:  # 16-bit (or wider) range -> 8 bits
            arr = arr / (65535.0 if arr.max() <= 65535 else arr.max()) * 255.0
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return im if im.mode == "RGB" else im.convert("RGB")
