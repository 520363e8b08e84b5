"""Shared parts of the decode paths: the exact (PIL + open_clip) item, loaders, prefetch.

Kept apart from :mod:`embeddings.decode` (the registry) so that both paths can use them
without an import cycle.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

from .fingerprint import Print, image_print
from .images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from .sources import ImageSource, as_source, read_key

Transform = Callable[[Any], torch.Tensor]
Item = tuple[int, tuple[torch.Tensor, ...] | None, str | None, Print | None]  # one file
T = TypeVar("T")


@dataclass
class PixelBatch:
    """Model-ready pixels of one batch, one tensor per image encoder, rows in input order."""

    indices: list[int]  # positions (in the input) that decoded, ascending
    pixels: list[torch.Tensor]  # per encoder: (len(indices), 3, H, W)
    failures: list[tuple[int, str]]  # (position, reject reason)
    prints: list[Print | None] | None = None  # per row of ``indices``: what was decoded


def worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the model for cores


def loader(dataset: Dataset, collate: Callable[[list[Any]], Any], *, batch_size: int,
           workers: int, pin: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate, pin_memory=pin,
                      worker_init_fn=worker_init if workers else None,
                      prefetch_factor=4 if workers else None, persistent_workers=False)


# ------------------------------------------------------------------------------ exact

class ImageFiles(Dataset):
    """Image keys of a source -> ``(index, tensors per transform | None, reason | None)``.

    ``source``: an :class:`~embeddings.sources.ImageSource` (a folder or URL is opened as
    one); the bytes come from :func:`~embeddings.sources.read_key`, whatever the source."""

    def __init__(self, source: ImageSource | str | os.PathLike, keys: Sequence[str],
                 transforms: Sequence[Transform], max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.source, self.keys, self.transforms = as_source(source), keys, transforms
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int) -> bytes:
        return read_key(self.source, self.keys[i])

    def __getitem__(self, i: int) -> Item:
        return exact_item(i, lambda: self.read(i), self.transforms, self.max_pixels)


def exact_item(i: int, read: Callable[[], bytes], transforms: Sequence[Transform],
               max_pixels: int) -> Item:
    """One file's bytes through PIL and the encoders' transforms, with its fingerprints
    (made from the bytes and pixels in hand: no second read), or the reason it cannot be."""
    try:
        data = read()
        image = decode_image(data, max_pixels)
        return i, tuple(t(image) for t in transforms), None, image_print(data, image)
    except ImageError as e:
        return i, None, str(e), None
    except Exception as e:  # a bad file must not kill the run
        return i, None, f"unreadable image: {type(e).__name__}: {e}", None


def collate_exact(batch: list[Item]) -> tuple[list[int], list[torch.Tensor],
                                              list[tuple[int, str]], list[Print | None]]:
    ok = [it for it in batch if it[1] is not None]
    failures = [(it[0], it[2]) for it in batch if it[1] is None]
    stacked = [torch.stack([it[1][k] for it in ok]) for k in range(len(ok[0][1]))] if ok else []
    return [it[0] for it in ok], stacked, failures, [it[3] for it in ok]


def exact_provenance(device: torch.device) -> dict[str, Any]:
    return {"decode": "exact", "decoder": "PIL", "resize": "open_clip preprocess (PIL)"}


def decode_exact(source: ImageSource, keys: Sequence[str], encoders: Sequence[Any], *,
                 device: torch.device, batch_size: int = 64, workers: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[PixelBatch]:
    """PIL + each encoder's ``image_transform`` in workers: float32 CPU tensors (pinned on
    CUDA), exactly what a direct open_clip call gives."""
    transforms = [e.image_transform for e in encoders]
    for indices, pixels, failures, prints in loader(
            ImageFiles(source, keys, transforms, max_pixels), collate_exact,
            batch_size=batch_size, workers=workers, pin=device.type == "cuda"):
        yield PixelBatch(indices, pixels, failures, prints)


# --------------------------------------------------------------------------- prefetch

_END = object()


@dataclass
class _Failed:
    error: BaseException


def prefetch(items: Iterator[T], device: torch.device, depth: int = 3) -> Iterator[T]:
    """Produce ``items`` in a thread (on a side CUDA stream) while the caller runs the model.

    Decoding and the model overlap: PIL, torch ops and CUDA kernels release the GIL.  On
    CUDA the items' ``pixels`` are made on the side stream and handed to the caller's.
    """
    q: queue.Queue[Any] = queue.Queue(depth)
    stop = threading.Event()
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None

    def put(item: Any) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                q.put(item, timeout=0.1)
                return True
        return False

    def run() -> None:
        try:
            ctx = torch.cuda.stream(side) if side is not None else contextlib.nullcontext()
            with torch.inference_mode(), ctx:
                for batch in items:
                    event = None
                    if side is not None:
                        event = torch.cuda.Event()
                        event.record(side)
                    if not put((batch, event)):
                        return
            put(_END)
        except BaseException as e:  # re-raised in the consumer
            put(_Failed(e))

    thread = threading.Thread(target=run, name="decode-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            got = q.get()
            if got is _END:
                return
            if isinstance(got, _Failed):
                raise got.error
            batch, event = got
            if event is not None:
                stream = torch.cuda.current_stream(device)
                stream.wait_event(event)
                for t in getattr(batch, "pixels", ()):
                    t.record_stream(stream)  # made on the side stream, used on this one
            yield batch
    finally:
        stop.set()
        thread.join(timeout=5)


