"""The records ingest hands out: images, captions, rejects, and blocks of them.

A :class:`Block` keeps its rows as two Arrow tables (what a shard writer wants) and builds
the record objects only when asked: making a million frozen dataclasses costs seconds,
the tables cost nothing more than the read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa

# Captions longer than this are rejects (`caption too long`): no text encoder reads past a
# few hundred tokens, and one stray megabyte-long field should not bloat every shard.
MAX_CAPTION_CHARS = 65_536

_LIST = pa.list_(pa.string())
IMAGE_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.string()), ("split", pa.string()),
                          ("label", pa.string()), ("labels", _LIST), ("captions", _LIST)])
CAPTION_SCHEMA = pa.schema([("id", pa.string()), ("image_id", pa.string()),
                            ("caption", pa.string()), ("split", pa.string()),
                            ("label", pa.string()), ("labels", _LIST)])


@dataclass(frozen=True)
class ImageRecord:
    id: str
    image: str  # path relative to the dataset root, POSIX separators
    split: str | None = None
    label: str | None = None
    labels: tuple[str, ...] = ()
    # The captions of this image's own run of contiguous rows; captions of a later,
    # non-contiguous repeat of the id are caption records of the block they appear in.
    captions: tuple[str, ...] = ()


@dataclass(frozen=True)
class CaptionRecord:
    id: str
    image_id: str | None
    caption: str
    split: str | None = None
    label: str | None = None
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reject:
    kind: str  # "images" or "captions"
    id: str
    reason: str  # "<short class>: <details>"; counts group by the part before ":"

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "id": self.id, "reason": self.reason}


@dataclass(frozen=True)
class Block:
    """The ``index``-th group of at most ``size`` images in manifest order, with the caption
    records and ingest rejects of the rows read for them."""

    index: int
    image_table: pa.Table  # IMAGE_SCHEMA: one row per image
    caption_table: pa.Table  # CAPTION_SCHEMA: one row per caption
    rejects: tuple[Reject, ...] = ()
    # A block of tar shards is read where it is embedded (a Ray task, not the driver):
    # ``pending`` says what to read, :meth:`ready` reads it.  The block read then carries
    # its images' bytes by key (``payload``) and the shard's sidecar accounting.
    pending: Any = None  # has .read() -> Block
    payload: Mapping[str, bytes] | None = field(default=None, repr=False)
    sidecar: Any = None  # embeddings.ingest.sidecar.Sidecar

    def ready(self) -> Block:
        """This block with its rows (a pending one is read now)."""
        return self.pending.read() if self.pending is not None else self

    def without_payload(self) -> Block:
        """The rows without the image bytes (cheap to ship once the images are decoded)."""
        return replace(self, payload=None)

    def image_column(self, name: str) -> list[Any]:
        """One column of the image rows (``id``, ``image``, ...) without building records."""
        return self.image_table.column(name).to_pylist()

    def caption_column(self, name: str) -> list[Any]:
        return self.caption_table.column(name).to_pylist()

    @cached_property
    def images(self) -> tuple[ImageRecord, ...]:
        return tuple(ImageRecord(i, im, s, lb, tuple(ls), tuple(cs))
                     for i, im, s, lb, ls, cs in _columns(self.image_table))

    @cached_property
    def captions(self) -> tuple[CaptionRecord, ...]:
        return tuple(CaptionRecord(i, im, c, s, lb, tuple(ls))
                     for i, im, c, s, lb, ls in _columns(self.caption_table))


def _columns(table: pa.Table) -> zip:
    return zip(*(table.column(i).to_pylist() for i in range(table.num_columns)))


@dataclass
class IngestStats:
    """Counts over every block of one pass, skipped ones included."""

    rows: int = 0
    blocks: int = 0
    images: int = 0
    captions: int = 0
    rejects: int = 0


@dataclass
class Dataset:
    root: Path | str  # a folder, or a remote root URL
    source: str
    format: str
    images: list[ImageRecord] = field(default_factory=list)
    captions: list[CaptionRecord] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.images)} images, {len(self.captions)} captions, "
            f"{len(self.rejects)} rejected at ingest ({self.format}: {self.source})"
        )
