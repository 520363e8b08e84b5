"""Defensive image loading: every input either becomes an RGB image or a reason.

Handles EXIF rotation, palette / alpha / CMYK / 16-bit modes, animated files (first
frame) and refuses images over a pixel budget before decoding them (decompression
bombs).  Failures raise :class:`ImageError` whose message is the reject reason.

The checks that need no decoding (file present and non-empty, format, size against the
pixel budget) are also available on their own (:func:`read_image_bytes`,
:func:`read_header`), so a fast decoder can run them in a worker and give a bad file the
same reason as :func:`load_image` would.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .limits import DEFAULT_MAX_PIXELS

EXIF_ORIENTATION = 0x0112


class ImageError(Exception):
    """An image that cannot be used; ``str(error)`` is the reason recorded for it."""


@dataclass(frozen=True)
class ImageHeader:
    """What the file header says, before any pixel is decoded."""

    format: str  # PIL format name: "JPEG", "PNG", ...
    width: int
    height: int
    mode: str  # PIL mode of the decoded file: "RGB", "L", "CMYK", ...
    orientation: int  # EXIF orientation (1: as stored)
    progressive: bool


@contextlib.contextmanager
def _reasons() -> Iterator[None]:
    """Turn every way PIL can fail into an :class:`ImageError` carrying the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image: {e}") from None


def _check_size(im: Image.Image, max_pixels: int) -> None:
    w, h = im.size
    if w * h > max_pixels:
        raise ImageError(f"image too large: {w}x{h} pixels (limit {max_pixels})")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ImageError("missing file")
    if path.stat().st_size == 0:
        raise ImageError("empty file (0 bytes)")


def _open_rgb(source: str | os.PathLike | io.BytesIO, max_pixels: int) -> Image.Image:
    with _reasons(), Image.open(source) as im:
        _check_size(im, max_pixels)
        im.seek(0)  # animated GIF/WebP/APNG: the first frame
        im.load()
        return to_rgb(ImageOps.exif_transpose(im))


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image, or raise :class:`ImageError` saying why not."""
    path = Path(path)
    _check_file(path)
    return _open_rgb(path, max_pixels)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """:func:`load_image` for a file already read into memory (same pixels, same reasons)."""
    return _open_rgb(io.BytesIO(data), max_pixels)


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes, or :class:`ImageError` ("missing file", "empty file") as
    :func:`load_image` would say."""
    path = Path(path)
    _check_file(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"unreadable image: {type(e).__name__}: {e}") from None
    if not data:
        raise ImageError("empty file (0 bytes)")
    return data


def read_image_fd(fd: int) -> bytes:
    """The bytes of an image file opened by its source (``fd`` is closed here), or
    :class:`ImageError` with the reasons of :func:`load_image` (a folder, a FIFO or a
    device is a "missing file": never read)."""
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ImageError("missing file")
        try:
            data = f.read()
        except OSError as e:
            raise ImageError(f"unreadable image: {type(e).__name__}: {e.strerror}") from None
    if not data:
        raise ImageError("empty file (0 bytes)")
    return data


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Parse the header only (no pixel decoding) and apply the pixel budget.

    Raises the :class:`ImageError` that :func:`load_image` raises for an unrecognised
    format or an image over the budget.
    """
    with _reasons(), Image.open(io.BytesIO(data)) as im:
        _check_size(im, max_pixels)
        orientation = 1
        if "exif" in im.info:
            orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
        return ImageHeader(format=im.format or "", width=im.size[0], height=im.size[1],
                           mode=im.mode, orientation=orientation,
                           progressive=bool(im.info.get("progressive")
                                            or im.info.get("progression")))


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
