"""Filter bitmaps cached beside the index: which rows a split / label filter keeps.

A filter's rows are computed with Arrow compute over the shards' ``split``, ``label`` and
``labels`` columns (:meth:`.columns.ColumnReader.mask`) and kept as a packed bitmap (one
bit per row, little-endian: what FAISS's ``IDSelectorBitmap`` takes) in
``RUN/index/filters/``.  Each file records the shards (file, digest) it covers; when the
embed stage appends shards, the bitmap of the old ones is reused and only the new shards
are read (a bitmap of any other shards is never used).  Each file starts with the
``xxh3_128`` digest of the rest; a bad file is recomputed.  The folder is a cache: deleting
it costs one recomputation per filter.  Nothing is cached in a run without an index
folder (a search needs an index: no stage folder appears because of a filter).  Files are
read without following links (a link there stops the command, like anywhere in a run);
files covering shards the embed manifest no longer lists are leftovers, removed when the
index stage next takes its lock.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from ..errors import FormatError, InputError
from .files import atomic_write_bytes, make_dirs, no_links, read_bytes


class FilterCache:
    def __init__(self, embed: Any, folder: Path) -> None:
        self.embed = embed  # EmbedFiles
        self.folder = folder

    def mask(self, kind: str, split: str | None = None,
             label: str | None = None) -> np.ndarray | None:
        """Bool per ``kind`` row kept by the filter (None when there is no filter)."""
        if split is None and label is None:
            return None
        shards = self._shards(kind)
        stem = self._stem(kind, ["mask", split, label])
        covered, data = self._best(stem, shards)
        rows = [r for _, _, r in shards]
        old = np.unpackbits(np.frombuffer(data, np.uint8), count=sum(rows[:covered]),
                            bitorder="little").astype(bool) if covered else np.zeros(0, bool)
        if covered == len(shards):
            return old
        new = self.embed.reader(kind).mask(split, label, range(covered, len(shards)))
        mask = np.concatenate([old, new])
        self._keep(stem, shards, np.packbits(mask, bitorder="little").tobytes())
        return mask

    def values(self, kind: str = "images") -> dict[str, Any]:
        """The distinct splits and labels of the ``kind`` rows, and how many rows."""
        shards = self._shards(kind)
        stem = self._stem(kind, ["values"])
        covered, data = self._best(stem, shards)
        out = json.loads(data) if covered else {"splits": [], "labels": []}
        if covered < len(shards):
            reader, more = self.embed.reader(kind), range(covered, len(shards))
            out = {"splits": sorted({*out["splits"], *reader.distinct("split", more)}),
                   "labels": sorted({*out["labels"], *reader.distinct("label", more)})}
            self._keep(stem, shards, json.dumps(out).encode())
        return {"rows": sum(r for _, _, r in shards), **out}

    def clear(self) -> None:
        if self._folder().is_dir():
            for path in self.folder.iterdir():
                if path.is_file() or path.is_symlink():
                    path.unlink(missing_ok=True)

    def leftovers(self) -> list[Path]:
        """Cached files no current filter can use: unreadable, or covering shards the embed
        manifest does not list (the embed stage was redone).  None while the manifest
        cannot be read."""
        if not self._folder().is_dir():
            return []
        try:
            shards = {k: [s[:2] for s in self._shards(k)] for k in ("images", "captions")}
        except FormatError:
            return []
        found = []
        for path in sorted(self.folder.iterdir()):
            if path.name.startswith(".") or not path.is_file() or path.is_symlink():
                continue  # temporary files and links: verify reports them
            got = _read(path)
            kind = path.name.split(".", 1)[0]
            if got is None or kind not in shards or \
                    [tuple(c[:2]) for c in got[0]] != shards[kind][:len(got[0])]:
                found.append(path)
        return found

    def clean(self) -> list[Path]:
        found = self.leftovers()
        for path in found:
            path.unlink(missing_ok=True)
        return found

    # ------------------------------------------------------------------ files

    def _folder(self) -> Path:
        return no_links(self.embed.run, self.folder)

    def _shards(self, kind: str) -> list[tuple[str, str, int]]:
        return [(r.file, r.digest, r.rows) for r in self.embed.manifest().shards[kind]]

    def _stem(self, kind: str, what: Sequence[Any]) -> str:
        return f"{kind}.{hashlib.sha256(json.dumps(list(what)).encode()).hexdigest()[:24]}"

    def _best(self, stem: str, shards: list[tuple[str, str, int]]) -> tuple[int, bytes]:
        """(shards covered, payload) of the cached file covering the longest prefix of
        ``shards`` (0 and nothing when none does)."""
        best: tuple[int, bytes] = (0, b"")
        if not self._folder().is_dir():
            return best
        for path in self.folder.glob(f"{stem}.*"):
            got = _read(path)
            if got is None:
                continue
            covers, payload = got
            n = len(covers)
            if n > best[0] and n <= len(shards) and \
                    [tuple(c[:2]) for c in covers] == [s[:2] for s in shards[:n]]:
                best = (n, payload)
        return best

    def _keep(self, stem: str, shards: list[tuple[str, str, int]], payload: bytes) -> None:
        if not no_links(self.embed.run, self.folder.parent).is_dir():
            return
        key = hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]
        head = json.dumps([list(s[:2]) for s in shards]).encode()
        body = struct.pack("<I", len(head)) + head + payload
        try:
            make_dirs(self.embed.run, self.folder)
            for old in self.folder.glob(f"{stem}.*"):
                if old.name != f"{stem}.{key}":
                    old.unlink(missing_ok=True)
            atomic_write_bytes(self.folder / f"{stem}.{key}", xxhash.xxh3_128(body).digest()
                               + body)
        except (OSError, InputError):  # a read-only run (or a full disk) answers, uncached
            pass


def _read(path: Path) -> tuple[list[list[str]], bytes] | None:
    try:
        data = read_bytes(path)  # a link is refused (Tampered), never followed
    except OSError:
        return None
    digest, body = data[:16], data[16:]
    if len(body) < 4 or xxhash.xxh3_128(body).digest() != digest:
        return None
    (size,) = struct.unpack("<I", body[:4])
    try:
        covers = json.loads(body[4:4 + size])
    except ValueError:
        return None
    return covers, body[4 + size:]
