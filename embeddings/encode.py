"""Batched embedding of images and texts with one or more encoders.

Images are decoded and preprocessed in DataLoader worker processes (in parallel with the
model, pinned memory on GPU); a bad image yields a reason instead of a tensor and never
stops the batch.  Outputs are L2-normalised float32 arrays keyed by encoder name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .encoders import Encoder
from .images import DEFAULT_MAX_PIXELS, ImageError, load_image


class ImageFiles(Dataset):
    """Image paths -> ``(index, tensors per transform | None, reason | None)``."""

    def __init__(self, root: Path, paths: Sequence[str],
                 transforms: Sequence[Callable[[Any], torch.Tensor]],
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.root, self.paths, self.transforms = root, paths, transforms
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, tuple[torch.Tensor, ...] | None, str | None]:
        try:
            image = load_image(self.root / self.paths[i], self.max_pixels)
            return i, tuple(t(image) for t in self.transforms), None
        except ImageError as e:
            return i, None, str(e)
        except Exception as e:  # a bad file must not kill the run
            return i, None, f"unreadable image: {type(e).__name__}: {e}"


@dataclass
class ImageBatch:
    indices: list[int]  # positions (in the input) that were embedded, in order
    vectors: dict[str, np.ndarray]  # encoder name -> (len(indices), dim)
    failures: list[tuple[int, str]]  # (position, reason)


def _collate(batch: list[tuple[int, Any, str | None]]) -> tuple[list[int], list[torch.Tensor],
                                                                 list[tuple[int, str]]]:
    ok = [(i, t) for i, t, _ in batch if t is not None]
    failures = [(i, r) for i, t, r in batch if t is None]
    stacked = [torch.stack([t[k] for _, t in ok]) for k in range(len(ok[0][1]))] if ok else []
    return [i for i, _ in ok], stacked, failures


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the model for cores


def default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    return min(cores, 8) if device.type == "cuda" else max(1, min(cores, 4))


def iter_image_embeddings(
    root: Path, paths: Sequence[str], encoders: Sequence[Encoder], *, device: torch.device,
    batch_size: int = 64, workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[ImageBatch]:
    """Embed images in input order, batch by batch, with every image encoder."""
    image_encoders = [e for e in encoders if "image" in e.modalities]
    transforms = [e.image_transform for e in image_encoders]
    workers = default_workers(device) if workers is None else workers
    loader = DataLoader(
        ImageFiles(root, paths, transforms, max_pixels), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None, persistent_workers=False)
    for indices, tensors, failures in loader:
        yield _encode(image_encoders, indices, tensors, failures)


Decoded = tuple[int, tuple[torch.Tensor, ...] | None, str | None]  # an ImageFiles item


def iter_decoded_embeddings(items: Sequence[Decoded], encoders: Sequence[Encoder], *,
                            batch_size: int = 64) -> Iterator[ImageBatch]:
    """As :func:`iter_image_embeddings`, for images :class:`ImageFiles` decoded elsewhere
    (a distributed engine decodes on CPU workers and runs the models on others)."""
    image_encoders = [e for e in encoders if "image" in e.modalities]
    for start in range(0, len(items), batch_size):
        yield _encode(image_encoders, *_collate(list(items[start:start + batch_size])))


def _encode(image_encoders: Sequence[Encoder], indices: list[int],
            tensors: list[torch.Tensor], failures: list[tuple[int, str]]) -> ImageBatch:
    vectors = {e.spec.name: e.encode_images(t) for e, t in zip(image_encoders, tensors)}
    return ImageBatch(indices, vectors, failures)


def embed_texts(texts: Sequence[str], encoders: Sequence[Encoder],
                batch_size: int = 256) -> dict[str, np.ndarray]:
    """Embed ``texts`` with every text encoder, ``batch_size`` per model call."""
    return {e.spec.name: e.encode_texts(texts, batch_size)
            for e in encoders if "text" in e.modalities}
