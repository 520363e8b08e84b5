"""Open a dataset once, then stream it in blocks as often as needed."""

from __future__ import annotations

import os
from collections.abc import Container, Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError, MissingError
from ..sources import FileSource, ImageSource, Network, is_url, open_source
from .blocks import Grouper
from .readers import chunks, detect_format, prefetch
from .records import Block, Dataset, IngestStats
from .rows import RowChecker
from .webdataset import Fields, TarDataset, is_tar_pattern, open_webdataset

LOAD_BLOCK = 65_536  # block size load_dataset materialises with (any size gives the same)


class Source:
    """A dataset description: its manifest, format and image source; :meth:`blocks`
    streams it."""

    fixed_blocks = False  # the last block may grow when rows are appended

    def __init__(self, path: Path, image_source: ImageSource, format: str) -> None:
        self.path, self.image_source, self.format = path, image_source, format
        self.root: Path | str = image_source.root if isinstance(image_source, FileSource) \
            else image_source.location
        self.source = str(path)
        self.stats = IngestStats()

    def describe(self) -> dict[str, Any]:
        """What identifies the dataset (recorded with the run, compared on resume)."""
        out: dict[str, Any] = {"source": str(self.path.resolve()), "root": str(self.root),
                               "format": self.format}
        if self.image_source.kind != FileSource.kind:  # runs of local files keep their spec
            out["image_source"] = self.image_source.describe()
        return out

    def blocks(self, size: int, skip: Container[int] = ()) -> Iterator[Block]:
        """Blocks of ``size`` images in manifest order (block k: images k*size.. (k+1)*size-1,
        their captions, the rejects of the rows read for them).  Blocks in ``skip`` go
        through the same vectorised pass (ids and boundaries depend on them) but are neither
        built nor yielded.  :attr:`stats` counts every block of the pass, skipped included."""
        self.stats = IngestStats()
        # Reading, normalising and the per-row checks run a chunk or two ahead in a thread
        # (Arrow kernels release the GIL), the grouping here.
        rows = prefetch(map(RowChecker(self.image_source), chunks(self.path, self.format)))
        yield from Grouper(size, skip, self.stats).run(rows)
        if not self.stats.rows:
            what = "no images" if self.format == "imagefolder" else "no data rows"
            raise InputError(f"{self.path} has {what}: there is nothing to ingest")


def open_dataset(path: str | os.PathLike | list[str], root: str | os.PathLike | None = None,
                 format: str = "auto", *, fields: Fields | None = None,
                 net: Network | None = None) -> Source | TarDataset:
    """Check that ``path`` exists and tell its format; nothing is read yet (but JSON).

    ``path``: a manifest or image folder (images under ``root``: a folder, default the
    manifest's, or a remote root ``s3://bucket/prefix``, ``https://host/path``), or
    webdataset tar shards (a brace pattern, a list; local or remote)."""
    if format == "webdataset" or (format == "auto" and is_tar_pattern(path)):
        if root is not None:
            raise InputError("root does not apply to tar shards: their members are the images")
        return open_webdataset(path if isinstance(path, (str, list)) else str(path), fields, net)
    if fields is not None and any(vars(fields).values()):
        raise InputError("caption_field, label_field, labels_field and split_field apply to "
                         "webdataset tar shards only (a manifest names its own columns)")
    if isinstance(path, list) or is_url(str(path)):
        raise InputError(f"{path}: a manifest is read from a local file; its image column may "
                         "hold URLs or keys under a remote root (set root = s3://... or "
                         "https://...)")
    path = Path(path)
    if not path.exists():
        raise MissingError(f"dataset not found: {path}")
    fmt = detect_format(path) if format == "auto" else format
    if root is not None and is_url(str(root)):
        image_source = open_source(str(root), net)
    else:
        base = Path(root) if root is not None else (path if path.is_dir() else path.parent)
        image_source = FileSource(base)
    return Source(path, image_source, fmt)


def load_dataset(path: str | os.PathLike, root: str | os.PathLike | None = None,
                 format: str = "auto") -> Dataset:
    """The whole dataset in memory: every block of :func:`open_dataset`, concatenated."""
    src = open_dataset(path, root, format)
    ds = Dataset(root=src.root, source=src.source, format=src.format)
    for block in src.blocks(LOAD_BLOCK):
        block = block.ready()
        ds.images += block.images
        ds.captions += block.captions
        ds.rejects += block.rejects
    return ds
