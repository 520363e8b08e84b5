"""The index stage's files: per embedding column an index file, optionally its on-disk
inverted lists and its recall state, and the manifest naming them.

Files get a fresh name on every write (``<column>.<token>.faiss``, ``.ivfdata`` for the
lists of an index too large for memory, ``.truth.npz`` for the exact neighbours of the
recall queries, so an add re-measures from the new shards alone); the manifest, replaced
atomically, names the current ones with their sizes and digests, and the old files are
removed only after that, so a crash never leaves a manifest naming a missing file.  This
module does no FAISS itself: the caller hands it a function that writes paths.

The manifest is sealed (:mod:`.seal`) and records every file's size and digest, so the
seal covers the lists and recall state files as it covers the index file; all three are
opened without following links.  A lists file can be tens of GB: opening an index for
search checks its size, and its digest only up to ``DIGEST_MAX`` bytes (``verify`` and the
index stage check it whole).  What a killed build left (files no entry names, ``.build-*``
scratch folders) is removed when the index stage next takes its lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from . import seal
from .files import (
    TMP_SUFFIX,
    Tampered,
    _umask_mode,
    atomic_write_json,
    check_file,
    check_name,
    confined,
    file_record,
    make_dirs,
    no_links,
    open_file,
    read_json,
    write_errors,
)
from .provenance import Provenance

SCHEMA_VERSION = 2
REMEDY = "rebuild it with `python -m pipeline index --rebuild`"
SUFFIXES = {"index": ".faiss", "lists": ".ivfdata", "truth": ".truth.npz"}
DIGEST_MAX = 2**30  # lists files above this are size-checked at open, digested by verify
SCRATCH_PREFIX = ".build-"  # a build's part files (removed after it, or as a leftover)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpan:
    file: str
    rows: int


@dataclass(frozen=True)
class IndexEntry:
    """One column's index: the file, what it covers, how it searches, how good it is."""

    column: str
    kind: str
    file: str
    bytes: int
    digest: str
    factory: str
    params: dict[str, int]
    ntotal: int
    dim: int
    shards: list[ShardSpan]
    provenance: Provenance
    recall_at_10: float
    auto: bool
    stats: dict[str, Any] = field(default_factory=dict)  # build/add times, budget, versions
    lists: dict[str, Any] | None = None  # on-disk inverted lists: file, bytes, digest
    truth: dict[str, Any] | None = None  # recall queries and their exact neighbours

    @property
    def files_key(self) -> str:
        """Names these index files' contents (index and lists digests): what is cached
        about them (a filter's placement in the lists) is valid while it is unchanged."""
        return self.digest + str((self.lists or {}).get("digest", ""))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["provenance"] = self.provenance.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> IndexEntry:
        try:
            if not isinstance(d, dict):
                raise TypeError("an entry is not an object")
            for key in ("lists", "truth"):
                rec = d.get(key)
                if rec is not None and not (isinstance(rec, dict) and isinstance(
                        rec.get("file"), str) and isinstance(rec.get("bytes"), int)):
                    raise TypeError(f"{key} is not a file record")
            return cls(**{**d, "shards": [ShardSpan(**s) for s in d["shards"]],
                          "provenance": Provenance.from_dict(d["provenance"], where)})
        except (KeyError, TypeError) as e:
            raise FormatError(f"{where} is corrupt ({type(e).__name__}: {e}): {REMEDY}") from None


class IndexFiles:
    def __init__(self, run: Path) -> None:
        self.run = run
        self.dir = run / "index"
        self.manifest_path = self.dir / "manifest.json"
        self.trusted = False  # whether the manifest last read was sealed on this machine

    def entries(self, ignore_damage: bool = False) -> dict[str, IndexEntry]:
        """The recorded indexes by column ({} when none was built).  ``ignore_damage``
        (``index --rebuild``): a manifest in any bad state counts as none, with a warning."""
        try:
            return self._entries()
        except FormatError as e:
            if not ignore_damage:
                raise
            log.warning("%s; rebuilding every index from scratch", e)
            return {}

    def _entries(self) -> dict[str, IndexEntry]:
        path = no_links(self.run, self.manifest_path)
        if not os.path.lexists(path):
            return {}
        d = read_json(path, "index manifest", REMEDY)
        if d.get("schema_version") != SCHEMA_VERSION:
            raise FormatError(f"{path} has schema version {d.get('schema_version')}, this "
                              f"version reads {SCHEMA_VERSION}: {REMEDY}")
        self.trusted = seal.check(d, path, "index manifest", REMEDY)
        indexes = d.get("indexes")
        if not isinstance(indexes, dict):
            raise FormatError(f"index manifest {path} is corrupt (no indexes): {REMEDY}")
        entries = {c: IndexEntry.from_dict(e, f"index manifest {path}, column {c}")
                   for c, e in indexes.items()}
        for entry in entries.values():  # a tampered name is refused before any work
            self.path(entry), self.lists_path(entry), self.truth_path(entry)
        return entries

    def write_entries(self, entries: dict[str, IndexEntry]) -> None:
        make_dirs(self.run, self.dir)
        atomic_write_json(no_links(self.run, self.manifest_path), seal.seal({
            "schema_version": SCHEMA_VERSION, "stage": "index",
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "indexes": {c: e.to_dict() for c, e in sorted(entries.items())}}))
        self.clean(entries, replaced=True)

    @contextlib.contextmanager
    def writing(self, column: str) -> Iterator[NewFiles]:
        """New files of one column's index: temporary paths to fill, renamed into place
        when the block succeeds (then ``.records`` holds their names, sizes, digests)."""
        make_dirs(self.run, self.dir)
        new = NewFiles(self.run, self.dir,
                       f"{check_name(column, 'column')}.{secrets.token_hex(4)}")
        try:
            with write_errors(self.dir):
                try:
                    yield new
                except RuntimeError as e:  # FAISS reports a failed write as a RuntimeError
                    if "No space left" in str(e) or "errno 28" in str(e).lower():
                        raise OSError(errno.ENOSPC, "No space left on device") from None
                    raise
            new.commit()
        finally:
            new.discard()

    def save(self, column: str, write: Callable[[Path], None]) -> dict[str, Any]:
        """Write a new index file for ``column`` with ``write(tmp_path)``; its record."""
        with self.writing(column) as new:
            write(new.tmp("index"))
        return new.records["index"]

    def _named(self, name: str, what: str) -> Path:
        return confined(self.dir, name, what, root=self.run, source=self.manifest_path,
                        remedy=REMEDY)

    def path(self, entry: IndexEntry) -> Path:
        return self._named(entry.file, "index file")

    def lists_path(self, entry: IndexEntry) -> Path | None:
        return self._named(entry.lists["file"], "index lists file") if entry.lists else None

    def truth_path(self, entry: IndexEntry) -> Path | None:
        return self._named(entry.truth["file"], "recall state file") if entry.truth else None

    def check(self, entry: IndexEntry, full: bool = True, deep: bool = False) -> Path:
        """The index file, after checking its size (and digest unless ``full`` is off)
        and those of its lists file (its digest only up to ``DIGEST_MAX`` unless ``deep``);
        ``deep`` (the index stage, verify) checks the recall state file too.  A link in
        place of any is refused (:class:`~.files.Tampered`), never followed."""
        path = self.path(entry)
        check_file(path, {"bytes": entry.bytes, "digest": entry.digest}, "index file", REMEDY,
                   full=full)
        if entry.lists:
            check_file(self.lists_path(entry), entry.lists, "index lists file", REMEDY,
                       full=full and (deep or entry.lists["bytes"] <= DIGEST_MAX))
        if entry.truth and deep:
            check_file(self.truth_path(entry), entry.truth, "recall state file", REMEDY,
                       full=full)
        return path

    def read_truth(self, entry: IndexEntry) -> dict[str, Any] | None:
        """The saved recall state of ``entry`` (arrays by name); None if absent or corrupt
        (it is measured afresh).  A link in its place is refused (:class:`Tampered`)."""
        path = self.truth_path(entry)
        if path is None:
            return None
        try:
            check_file(path, entry.truth, "recall state file", REMEDY)
            with os.fdopen(open_file(path), "rb") as f, \
                    np.load(f, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Tampered:
            raise
        except (FormatError, OSError, ValueError) as e:
            log.warning("%s: measuring recall afresh", e)
            return None

    def remove(self, entry: IndexEntry | str) -> None:
        """Delete the files of a replaced entry (or one index file by name)."""
        names = [entry] if isinstance(entry, str) else [
            entry.file, *(r["file"] for r in (entry.lists, entry.truth) if r)]
        for name in names:
            confined(self.dir, name, "index file", root=self.run).unlink(missing_ok=True)

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A scratch folder for a build's part files, removed afterwards (one a killed
        build left is a leftover: removed when the index stage next takes its lock)."""
        make_dirs(self.run, self.dir)
        with write_errors(self.dir):
            folder = Path(tempfile.mkdtemp(dir=self.dir, prefix=SCRATCH_PREFIX))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def leftovers(self, entries: dict[str, IndexEntry] | None = None) -> list[Path]:
        """What a killed build left, safe to remove under the index lock: index, lists and
        recall state files no manifest entry names, and build scratch folders.  Nothing
        is called a leftover while the manifest cannot be read.  (Stale filter bitmaps:
        :meth:`.filters.FilterCache.leftovers`.)"""
        folder = no_links(self.run, self.dir)
        if not folder.is_dir():
            return []
        if entries is None:
            try:
                entries = self._entries()
            except FormatError:
                return []
        named = {r["file"] for e in entries.values()
                 for r in ({"file": e.file}, e.lists, e.truth) if r}
        found = []
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith(SCRATCH_PREFIX) and e.is_dir(follow_symlinks=False):
                    found.append(folder / e.name)
                elif e.name.endswith(tuple(SUFFIXES.values())) and not e.name.startswith(".") \
                        and e.name not in named and e.is_file(follow_symlinks=False):
                    found.append(folder / e.name)
        return sorted(found)

    def clean(self, entries: dict[str, IndexEntry] | None = None,
              replaced: bool = False) -> list[Path]:
        """Remove :meth:`leftovers`; ``replaced``: just after a manifest write, where they
        are mostly the files of the entries it replaced (not worth a message)."""
        found = self.leftovers(entries)
        for path in found:
            log.log(logging.DEBUG if replaced else logging.INFO,
                    "removing %s: no index manifest entry names it (left by a killed run)",
                    path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)  # rmtree never follows links
            else:
                path.unlink(missing_ok=True)
        return found

    def verify(self) -> list[str]:
        """Every index, lists and recall state file checked whole (size and digest)."""
        problems = []
        for entry in self.entries().values():
            try:
                self.check(entry, deep=True)
            except FormatError as e:
                problems.append(str(e))
        return problems


class NewFiles:
    """Temporary files of one index write, by role (index | lists | truth)."""

    def __init__(self, run: Path, folder: Path, stem: str) -> None:
        self.run, self.folder, self.stem = run, folder, stem
        self.tmps: dict[str, Path] = {}
        self.records: dict[str, dict[str, Any]] = {}

    def name(self, role: str) -> str:
        return self.stem + SUFFIXES[role]

    def tmp(self, role: str) -> Path:
        if role not in self.tmps:
            make_dirs(self.run, self.folder)
            fd, name = tempfile.mkstemp(dir=self.folder, prefix=f".{self.name(role)}.",
                                        suffix=TMP_SUFFIX)
            os.close(fd)
            self.tmps[role] = Path(name)
        return self.tmps[role]

    def commit(self) -> None:
        """fsync and rename every file written (the index last), record each.  A rename
        replaces a link at the final name instead of writing through it."""
        with write_errors(self.folder):
            for role in sorted(self.tmps, key=lambda r: r == "index"):
                tmp, final = self.tmps[role], no_links(self.run, self.folder / self.name(role))
                os.chmod(tmp, _umask_mode())
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
                self.records[role] = file_record(final, final.name)
        self.tmps = {}

    def discard(self) -> None:
        for tmp in self.tmps.values():
            tmp.unlink(missing_ok=True)
