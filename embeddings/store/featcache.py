"""The heads' feature cache: one column's image-level features as a raw float16 file, for
runs whose features do not fit the heads' memory budget.

    RUN/heads/cache/<column>.<key>.f16    (n, dim) float16 row-major (row i: image row i),
                                          then n bytes: 1 where the image has the feature
    RUN/heads/cache/<column>.<key>.json   column, rows, dim, key, bytes, digest (last)

``key`` is a digest of what the features are made from: the column, its kind and width,
and the digests of the shards read (image shards, and caption shards for a text column).
A head run on the same shards reuses the file; a changed shard gives another key and the
files of the old one are removed once the new one is written.  The file is written
through a temporary file and a rename, its digest taken while writing and checked when
it is opened, like every file of a run.

Reads are plain ``pread`` calls of a contiguous row range into a fresh buffer, not a
memory map: mapped pages count in the process's resident memory, the page cache that
plain reads fill does not (the kernel drops it under pressure).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from ..errors import FormatError
from .files import (
    atomic_path,
    atomic_write_json,
    check_file,
    check_name,
    file_record,
    make_dirs,
    no_links,
    open_file,
    read_json,
)

VERSION = 1  # of the file layout and of how the features are made (caption means)
REMEDY = "delete it (the heads stage writes it again from the embed shards)"


def cache_key(column: str, kind: str, dim: int, shard_digests: Iterable[str]) -> str:
    """Digest of everything the cached features are made from."""
    h = xxhash.xxh3_128(f"{VERSION}\0{column}\0{kind}\0{dim}".encode())
    for d in shard_digests:
        h.update(b"\0" + d.encode())
    return h.hexdigest()[:20]


class CachedColumn:
    """One cached column, read by row ranges (stored float16)."""

    def __init__(self, path: Path, rows: int, dim: int, column: str) -> None:
        self.path, self.rows, self.dim, self.column = path, rows, dim, column
        self.shape = (rows, dim)
        self.dtype = np.dtype(np.float16)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a new ``(stop - start, dim)`` float16 array."""
        out = np.empty((max(0, stop - start), self.dim), np.float16)
        self._pread(memoryview(out).cast("B"), start * self.dim * 2)
        return out

    def present(self) -> np.ndarray:
        """Per row: True where the image has this feature (a text column: a caption)."""
        out = np.empty(self.rows, np.uint8)
        self._pread(memoryview(out), self.rows * self.dim * 2)
        return out.astype(bool)

    def _pread(self, buf: memoryview, offset: int) -> None:
        fd = open_file(self.path)
        try:
            got = 0
            while got < len(buf):
                n = os.preadv(fd, [buf[got:]], offset + got)
                if n <= 0:
                    raise FormatError(f"feature cache {self.path} is shorter than recorded: "
                                      f"{REMEDY}")
                got += n
        finally:
            os.close(fd)


class CacheWriter:
    """Rows appended in order, then :meth:`finish` with the present mask."""

    def __init__(self, f: Any, rows: int, dim: int) -> None:
        self.f, self.rows, self.dim = f, rows, dim
        self.written = 0

    def write(self, vectors: np.ndarray) -> None:
        v = np.ascontiguousarray(vectors, np.float16)
        if v.ndim != 2 or v.shape[1] != self.dim or self.written + len(v) > self.rows:
            raise ValueError(f"cache rows of shape {v.shape} do not fit ({self.written} of "
                             f"{self.rows} x {self.dim} written)")
        self.f.write(memoryview(v).cast("B"))
        self.written += len(v)


class FeatureCache:
    """The folder of cached feature files of one run (owned by :class:`HeadsFiles`)."""

    def __init__(self, run: Path, folder: Path) -> None:
        self.run, self.dir = run, folder

    def _paths(self, column: str, key: str) -> tuple[Path, Path]:
        stem = f"{check_name(column, 'column')}.{key}"
        return (no_links(self.run, self.dir / f"{stem}.f16"),
                no_links(self.run, self.dir / f"{stem}.json"))

    def open(self, column: str, key: str, rows: int, dim: int,
             verify: bool = True) -> CachedColumn | None:
        """The cached column of ``key`` if it is there and sound (a bad one is removed)."""
        data, meta = self._paths(column, key)
        if not os.path.lexists(meta):
            return None
        try:
            record = read_json(meta, "feature cache record", REMEDY)
            if (record.get("column"), record.get("key"), record.get("rows"),
                    record.get("dim")) != (column, key, rows, dim):
                raise FormatError(f"feature cache record {meta} describes other features")
            check_file(data, record, "feature cache", REMEDY, full=verify)
        except FormatError:
            for path in (meta, data):
                path.unlink(missing_ok=True)
            return None
        return CachedColumn(data, rows, dim, column)

    def write(self, column: str, key: str, rows: int, dim: int,
              fill: Any) -> CachedColumn:
        """Write the cache of ``key``: ``fill(writer)`` writes the rows in order and
        returns the present mask; the record is written last, older keys removed."""
        make_dirs(self.run, self.dir)
        data, meta = self._paths(column, key)
        with atomic_path(data) as tmp, open(tmp, "wb") as f:
            writer = CacheWriter(_Hashing(f), rows, dim)
            present = np.asarray(fill(writer), dtype=np.uint8)
            if writer.written != rows or len(present) != rows:
                raise ValueError(f"feature cache of {column}: {writer.written} rows and "
                                 f"{len(present)} flags written, {rows} expected")
            writer.f.write(memoryview(present))
            digest = writer.f.h.hexdigest()
        record = {**file_record(data, data.name), "digest": digest, "column": column,
                  "key": key, "rows": rows, "dim": dim, "dtype": "float16",
                  "version": VERSION}
        atomic_write_json(meta, record)
        self.remove(column, keep=key)
        return CachedColumn(data, rows, dim, column)

    def remove(self, column: str, keep: str | None = None) -> list[Path]:
        """Cache files of ``column`` other than key ``keep`` (stale ones)."""
        if not os.path.isdir(no_links(self.run, self.dir)):
            return []
        gone = []
        for path in sorted(self.dir.iterdir()):
            parts = path.name.split(".")
            if len(parts) == 3 and parts[0] == column and parts[1] != keep \
                    and parts[2] in ("f16", "json"):
                path.unlink(missing_ok=True)
                gone.append(path)
        return gone

    def files(self) -> Sequence[Path]:
        folder = no_links(self.run, self.dir)
        return sorted(folder.iterdir()) if folder.is_dir() else []


class _Hashing:
    """A file object that digests what goes through it (no second read of gigabytes)."""

    def __init__(self, f: Any) -> None:
        self.f, self.h = f, xxhash.xxh3_128()

    def write(self, data: memoryview) -> None:
        self.h.update(data)
        self.f.write(data)
