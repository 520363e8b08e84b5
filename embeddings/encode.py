"""Batched embedding of images and texts with one or more encoders.

Images come from :mod:`embeddings.decode` (the ``exact`` PIL path or the ``fast``
batched-JPEG path, decoding in parallel with the model); a bad image yields a reason
instead of a tensor and never stops the batch.  Outputs are L2-normalised float32
arrays keyed by encoder name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .decode import iter_pixels
from .decode_base import ImageFiles, Item, collate_exact
from .encoders import Encoder
from .fingerprint import Print
from .limits import DEFAULT_MAX_PIXELS
from .sources import ImageSource


@dataclass
class ImageBatch:
    indices: list[int]  # positions (in the input) that were embedded, in order
    vectors: dict[str, np.ndarray]  # encoder name -> (len(indices), dim)
    failures: list[tuple[int, str]]  # (position, reason)
    prints: list[Print | None] | None = None  # per row of ``indices`` (None: not made)


def default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    return min(cores, 8) if device.type == "cuda" else max(1, min(cores, 4))


def iter_image_embeddings(
    source: ImageSource | str | os.PathLike, keys: Sequence[str], encoders: Sequence[Encoder],
    *, device: torch.device,
    batch_size: int = 64, workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
    decode: str = "auto",
) -> Iterator[ImageBatch]:
    """Embed the images of ``keys`` (read from ``source``) in input order, batch by batch,
    with every image encoder.

    ``decode`` names the path (:func:`embeddings.decode.resolve_decode`): ``auto`` is
    ``fast`` on CUDA and ``exact`` (bit-for-bit open_clip) on CPU.
    """
    image_encoders = [e for e in encoders if "image" in e.modalities]
    workers = default_workers(device) if workers is None else workers
    for batch in iter_pixels(source, keys, image_encoders, decode=decode, device=device,
                             batch_size=batch_size, workers=workers, max_pixels=max_pixels):
        vectors = {e.spec.name: e.encode_images(x)
                   for e, x in zip(image_encoders, batch.pixels)} if batch.indices else {}
        yield ImageBatch(batch.indices, vectors, batch.failures, batch.prints)


Decoded = Item  # an ImageFiles item: (position, tensors | None, reason | None, print | None)


def iter_decoded_embeddings(items: Sequence[Decoded], encoders: Sequence[Encoder], *,
                            batch_size: int = 64) -> Iterator[ImageBatch]:
    """As :func:`iter_image_embeddings`, for images :class:`ImageFiles` decoded elsewhere
    (a distributed engine decodes on CPU workers and runs the models on others)."""
    image_encoders = [e for e in encoders if "image" in e.modalities]
    for start in range(0, len(items), batch_size):
        indices, tensors, failures, prints = collate_exact(list(items[start:start + batch_size]))
        vectors = {e.spec.name: e.encode_images(t) for e, t in zip(image_encoders, tensors)}
        yield ImageBatch(indices, vectors, failures, prints)


__all__ = ["Decoded", "ImageBatch", "ImageFiles", "default_workers", "embed_texts",
           "iter_decoded_embeddings", "iter_image_embeddings"]


def embed_texts(texts: Sequence[str], encoders: Sequence[Encoder],
                batch_size: int = 256) -> dict[str, np.ndarray]:
    """Embed ``texts`` with every text encoder, ``batch_size`` per model call."""
    return {e.spec.name: e.encode_texts(texts, batch_size)
            for e in encoders if "text" in e.modalities}
