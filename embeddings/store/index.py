"""The index stage's files: one FAISS file per embedding column and their manifest.

Index files get a fresh name on every write (``<column>.<token>.faiss``); the manifest,
replaced atomically, names the current one with its size and digest, and the old file
is removed only after that, so a crash never leaves a manifest naming a missing index.
This module does no FAISS itself: the caller hands it a function that writes a path.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FormatError
from . import seal
from .files import (
    atomic_path,
    atomic_write_json,
    check_file,
    check_name,
    confined,
    file_record,
    make_dirs,
    no_links,
    read_json,
)
from .provenance import Provenance

SCHEMA_VERSION = 2
REMEDY = "rebuild it with `python -m pipeline index --rebuild`"
INDEX_SUFFIX = ".faiss"
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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["provenance"] = self.provenance.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> IndexEntry:
        try:
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
            self.path(entry)
        return entries

    def write_entries(self, entries: dict[str, IndexEntry]) -> None:
        make_dirs(self.run, self.dir)
        atomic_write_json(no_links(self.run, self.manifest_path), seal.seal({
            "schema_version": SCHEMA_VERSION, "stage": "index",
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "indexes": {c: e.to_dict() for c, e in sorted(entries.items())}}))
        self.clean(entries)

    def save(self, column: str, write: Callable[[Path], None]) -> dict[str, Any]:
        """Write a new index file for ``column`` with ``write(tmp_path)``; its record."""
        name = f"{check_name(column, 'column')}.{secrets.token_hex(4)}{INDEX_SUFFIX}"
        make_dirs(self.run, self.dir)
        path = no_links(self.run, self.dir / name)
        with atomic_path(path) as tmp:
            try:
                write(tmp)
            except RuntimeError as e:  # FAISS reports a failed write as a RuntimeError
                if "No space left" in str(e) or "errno 28" in str(e).lower():
                    raise OSError(errno.ENOSPC, "No space left on device") from None
                raise
        return file_record(path, name)

    def path(self, entry: IndexEntry) -> Path:
        return confined(self.dir, entry.file, "index file", root=self.run,
                        source=self.manifest_path, remedy=REMEDY)

    def check(self, entry: IndexEntry, full: bool = True) -> Path:
        """The index file, after checking its size (and digest unless ``full`` is off)."""
        path = self.path(entry)
        check_file(path, {"bytes": entry.bytes, "digest": entry.digest}, "index file", REMEDY,
                   full=full)
        return path

    def remove(self, file: str) -> None:
        confined(self.dir, file, "index file", root=self.run).unlink(missing_ok=True)

    def leftovers(self, entries: dict[str, IndexEntry] | None = None) -> list[Path]:
        """Index files no manifest entry names (a killed build's): safe to remove under the
        index lock.  Nothing is called a leftover while the manifest cannot be read."""
        folder = no_links(self.run, self.dir)
        if not folder.is_dir():
            return []
        if entries is None:
            try:
                entries = self._entries()
            except FormatError:
                return []
        named = {e.file for e in entries.values()}
        with os.scandir(folder) as it:
            return sorted(folder / e.name for e in it if e.name.endswith(INDEX_SUFFIX)
                          and not e.name.startswith(".") and e.name not in named
                          and e.is_file(follow_symlinks=False))

    def clean(self, entries: dict[str, IndexEntry] | None = None) -> list[Path]:
        found = self.leftovers(entries)
        for path in found:
            log.info("removing %s: no index manifest entry names it (left by a killed run)",
                     path)
            path.unlink(missing_ok=True)
        return found

    def verify(self) -> list[str]:
        problems = []
        for entry in self.entries().values():
            try:
                self.check(entry)
            except FormatError as e:
                problems.append(str(e))
        return problems
