"""Open a dataset once, then stream it in blocks as often as needed."""

from __future__ import annotations

import os
from collections.abc import Container, Iterator
from pathlib import Path

from ..errors import InputError, MissingError
from .blocks import Grouper
from .readers import chunks, detect_format, prefetch
from .records import Block, Dataset, IngestStats
from .rows import RowChecker

LOAD_BLOCK = 65_536  # block size load_dataset materialises with (any size gives the same)


class Source:
    """A dataset description: its root, source path and format; :meth:`blocks` streams it."""

    def __init__(self, path: Path, root: Path, format: str) -> None:
        self.path, self.root, self.format = path, root, format
        self.source = str(path)
        self.stats = IngestStats()

    def blocks(self, size: int, skip: Container[int] = ()) -> Iterator[Block]:
        """Blocks of ``size`` images in manifest order (block k: images k*size.. (k+1)*size-1,
        their captions, the rejects of the rows read for them).  Blocks in ``skip`` go
        through the same vectorised pass (ids and boundaries depend on them) but are neither
        built nor yielded.  :attr:`stats` counts every block of the pass, skipped included."""
        self.stats = IngestStats()
        # Reading, normalising and the per-row checks run a chunk or two ahead in a thread
        # (Arrow kernels release the GIL), the grouping here.
        rows = prefetch(map(RowChecker(self.root), chunks(self.path, self.format)))
        yield from Grouper(size, skip, self.stats).run(rows)
        if not self.stats.rows:
            what = "no images" if self.format == "imagefolder" else "no data rows"
            raise InputError(f"{self.path} has {what}: there is nothing to ingest")


def open_dataset(path: str | os.PathLike, root: str | os.PathLike | None = None,
                 format: str = "auto") -> Source:
    """Check that ``path`` exists and tell its format; nothing is read yet (but JSON)."""
    path = Path(path)
    if not path.exists():
        raise MissingError(f"dataset not found: {path}")
    fmt = detect_format(path) if format == "auto" else format
    base = Path(root) if root is not None else (path if path.is_dir() else path.parent)
    return Source(path, base.resolve(), fmt)


def load_dataset(path: str | os.PathLike, root: str | os.PathLike | None = None,
                 format: str = "auto") -> Dataset:
    """The whole dataset in memory: every block of :func:`open_dataset`, concatenated."""
    src = open_dataset(path, root, format)
    ds = Dataset(root=src.root, source=src.source, format=src.format)
    for block in src.blocks(LOAD_BLOCK):
        ds.images += block.images
        ds.captions += block.captions
        ds.rejects += block.rejects
    return ds
