"""Filter bitmaps cached beside the index: which rows a split / label filter keeps.

A filter's rows are computed once with Arrow compute over the shards' ``split``,
``label`` and ``labels`` columns (:meth:`.columns.ColumnReader.mask`), then kept as a
packed bitmap (one bit per row, little-endian: what FAISS's ``IDSelectorBitmap`` takes)
in ``RUN/index/filters/``, named by a hash of the filter and of the shards it was computed
from (their digests), so a bitmap of other shards is never used.  Each file starts with
the ``xxh3_128`` digest of the bits; a bad file is recomputed.  The folder is a cache:
deleting it costs one recomputation per filter.  Nothing is cached in a run without an
index folder (a search needs an index: no stage folder appears because of a filter).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from .files import atomic_write_bytes, read_json


class FilterCache:
    def __init__(self, embed: Any, folder: Path) -> None:
        self.embed = embed  # EmbedFiles
        self.folder = folder

    def _key(self, kind: str, what: Sequence[Any]) -> str:
        shards = [(r.file, r.digest) for r in self.embed.manifest().shards[kind]]
        text = json.dumps([kind, list(what), shards])
        return f"{kind}.{hashlib.sha256(text.encode()).hexdigest()[:32]}"

    def mask(self, kind: str, split: str | None = None,
             label: str | None = None) -> np.ndarray | None:
        """Bool per ``kind`` row kept by the filter (None when there is no filter)."""
        if split is None and label is None:
            return None
        n = self.embed.manifest().rows(kind)
        path = self.folder / f"{self._key(kind, ['mask', split, label])}.bits"
        got = _read_bits(path, n)
        if got is not None:
            return got
        mask = self.embed.reader(kind).mask(split, label)
        bits = np.packbits(mask, bitorder="little").tobytes()
        self._keep(path, xxhash.xxh3_128(bits).digest() + bits)
        return mask

    def values(self, kind: str = "images") -> dict[str, Any]:
        """The distinct splits and labels of the ``kind`` rows, and how many rows."""
        path = self.folder / f"{self._key(kind, ['values'])}.json"
        if path.is_file():
            try:
                return dict(read_json(path, "filter values", ""))
            except ValueError:
                pass
        reader = self.embed.reader(kind)
        out = {"rows": reader.offsets.total, "splits": reader.distinct("split"),
               "labels": reader.distinct("label")}
        self._keep(path, json.dumps(out).encode())
        return out

    def _keep(self, path: Path, data: bytes) -> None:
        if not self.folder.parent.is_dir():
            return
        try:
            atomic_write_bytes(path, data)
        except OSError:  # a read-only run still answers, uncached
            pass

    def clear(self) -> None:
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                if path.is_file():
                    path.unlink(missing_ok=True)


def _read_bits(path: Path, n: int) -> np.ndarray | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head, bits = data[:16], data[16:]
    if len(bits) != (n + 7) // 8 or xxhash.xxh3_128(bits).digest() != head:
        return None
    return np.unpackbits(np.frombuffer(bits, np.uint8), count=n,
                         bitorder="little").astype(bool)
