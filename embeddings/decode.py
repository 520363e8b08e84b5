"""Image decoding for the embed stage: image bytes -> model-ready pixels, two paths by name.

Bytes come from an image source (:mod:`embeddings.sources`: local files, objects under a
remote root, tar members held in memory); the paths below never know where they live.

``exact``: PIL decode (:func:`embeddings.images.load_image`) and the encoder's own
open_clip preprocess in DataLoader workers; bit-for-bit what a direct open_clip call
gives.  The reference, and the default on CPU.

``fast``: workers only read bytes and check the header (size, pixel budget, format,
EXIF rotation, CMYK); JPEGs are decoded in batches (nvJPEG through
``torchvision.io.decode_jpeg`` on CUDA; on CPU libjpeg-turbo, through PIL's draft mode
when the file is at least twice the target size, so the DCT does part of the
downscaling), then resized (antialiased bicubic on uint8, as PIL does), centre-cropped
and normalised as batched tensor ops on the device, in the model's dtype.  Every other
file, and any JPEG the batch decoder refuses, goes through the exact path for that item
alone, so a bad file gets the same reject reason as with ``exact``.

``auto`` picks ``fast`` on CUDA and ``exact`` elsewhere.  :func:`register_decoder` adds
more paths; :func:`decode_provenance` says what a path did, for the manifest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .decode_base import PixelBatch, decode_exact, exact_provenance
from .decode_fast import decode_fast, fast_capable, fast_provenance
from .errors import InputError
from .images import DEFAULT_MAX_PIXELS
from .sources import ImageSource, as_source

__all__ = ["DECODERS", "PixelBatch", "decode_provenance", "iter_pixels", "register_decoder",
           "resolve_decode"]

Decoder = Callable[..., Iterator[PixelBatch]]
Provenance = Callable[[torch.device], dict[str, Any]]
DECODERS: dict[str, tuple[Decoder, Provenance]] = {}


def register_decoder(name: str, decoder: Decoder, provenance: Provenance) -> None:
    """Add a path: ``decoder(source, keys, encoders, *, device, batch_size, workers,
    max_pixels) -> Iterator[PixelBatch]``; ``provenance(device)`` describes it."""
    DECODERS[name] = (decoder, provenance)


register_decoder("exact", decode_exact, exact_provenance)
register_decoder("fast", decode_fast, fast_provenance)


def resolve_decode(name: str, device: torch.device | str, encoders: Sequence[Any] = ()) -> str:
    """The registered path that ``name`` means here (``auto``: fast on CUDA, else exact)."""
    device = torch.device(device)
    if name == "auto":
        ok = device.type == "cuda" and all(fast_capable(e) for e in encoders)
        return "fast" if ok else "exact"
    if name not in DECODERS:
        raise InputError(f"unknown decode {name!r}; known: {['auto', *sorted(DECODERS)]}")
    bad = [e.spec.name if hasattr(e, "spec") else type(e).__name__
           for e in encoders if name == "fast" and not fast_capable(e)]
    if bad:
        raise InputError(f"decode='fast' needs image encoders with an open_clip RGB "
                         f"preprocess_cfg; {', '.join(bad)} has none: use decode='exact'")
    return name


def decode_provenance(name: str, device: torch.device | str = "cpu",
                      encoders: Sequence[Any] = ()) -> dict[str, Any]:
    """What decode path ``name`` does on ``device``, recorded per embedding column."""
    device = torch.device(device)
    return DECODERS[resolve_decode(name, device, encoders)][1](device)


def iter_pixels(source: ImageSource | str | os.PathLike, keys: Sequence[str],
                encoders: Sequence[Any], *, decode: str = "auto", device: torch.device,
                batch_size: int = 64, workers: int = 0,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[PixelBatch]:
    """Decode the image of every key of ``source`` (a folder or URL: opened as a source),
    batch by batch, in input order.

    ``encoders`` are the image encoders; ``pixels[k]`` of each batch is for ``encoders[k]``.
    """
    decoder = DECODERS[resolve_decode(decode, device, encoders)][0]
    return decoder(as_source(source), keys, encoders, device=device, batch_size=batch_size,
                   workers=workers, max_pixels=max_pixels)
