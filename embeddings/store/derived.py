"""Derived embedding columns: vectors a later stage computed from the run's own columns
(the ``latent`` stage's meta-space), kept beside the embed shards and read like them.

Layout::

    RUN/derived/manifest.json                          sealed, written last: per column its
                                                       description (kind, provenance), the
                                                       stage and saved model that made it,
                                                       one part per embed shard
    RUN/derived/<column>/part-<block>.<token>.parquet  the vectors of embed shard <block>:
                                                       the same rows in the same order

Each part records the embed shard it was computed from (file, rows, digest) and its own
size and digest; readers check a part's digest before streaming it, as they do a shard's.
A column whose parts do not match the embed manifest's shards one for one (the embed stage
appended shards, or redid one, since), or whose input columns' models changed, is *stale*:
it is listed with the run's columns but reading it is refused with a message naming the
stage to rerun, which recomputes only the parts that no longer match (:func:`outdated`).
Parts get fresh names (a token), the manifest is replaced atomically and the files it no
longer names are removed after it, so a reader never meets a half-written column; what a
killed stage left is removed when the ``derived`` lock is next taken.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import FormatError
from . import seal
from .columns import ColumnReader
from .files import (
    atomic_write_bytes,
    atomic_write_json,
    check_file,
    check_name,
    confined,
    digest_file,
    make_dirs,
    no_links,
    read_json,
)
from .shards import ROW_GROUP_ROWS, vectors_to_arrow

VERSION = 1
REMEDY = ("remove the run's derived/ folder and rerun the stage that made the column "
          "(`python -m pipeline latent`)")
EMPTY = pa.schema([])  # a part holds no metadata column, only the vectors


@dataclass(frozen=True)
class DerivedPart:
    """One part of a derived column: the vectors of one embed shard."""

    file: str  # relative to RUN/derived
    block: int
    rows: int
    bytes: int
    digest: str
    source: str  # the embed shard (relative to RUN/embed) the rows are those of
    source_digest: str


@dataclass(frozen=True)
class DerivedColumn:
    """A derived column as its manifest records it (``spec``: the column's description,
    as :meth:`embeddings.store.Column.to_dict` writes it)."""

    name: str
    spec: dict[str, Any]
    stage: str  # the stage that writes it ("latent")
    model: str  # the saved model of that stage that made it
    parts: list[DerivedPart]

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "stage": self.stage, "model": self.model,
                "parts": [asdict(p) for p in self.parts]}


def outdated(col: DerivedColumn, shards: Sequence[Any]) -> list[int]:
    """Positions of the embed ``shards`` (records with file, rows, digest) whose part is
    missing or was computed from other bytes: what a rerun must recompute."""
    have = {(p.source, p.source_digest, p.rows) for p in col.parts}
    return [i for i, s in enumerate(shards) if (s.file, s.digest, s.rows) not in have]


def stale_reason(col: DerivedColumn, shards: Sequence[Any],
                 inputs: Mapping[str, Any] | None) -> str | None:
    """Why ``col`` cannot be read against these embed ``shards`` (None: it can).
    ``inputs``: the identities of the run's columns now (name -> provenance identity)."""
    kind = col.spec.get("kind", "?")
    fix = f"rerun `python -m pipeline {col.stage}`"
    recorded = ((col.spec.get("provenance") or {}).get("preprocess") or {}).get("inputs")
    if isinstance(recorded, dict) and inputs is not None:
        for name, identity in recorded.items():
            if name not in inputs:
                return (f"derived column {col.name} was made from column {name!r}, which "
                        f"this run no longer has: {fix} --rebuild, or remove it")
            if _canonical(identity) != _canonical(inputs[name]):
                return (f"derived column {col.name} was made from column {name!r} of a "
                        f"different model: {fix} --rebuild")
    now = [(s.file, s.digest, s.rows) for s in shards]
    had = [(p.source, p.source_digest, p.rows) for p in col.parts]
    if now == had:
        return None
    if had == now[:len(had)]:
        return (f"derived column {col.name} covers {len(had)} of the {len(now)} {kind} "
                f"shards (the embed stage added rows since {col.stage} wrote it): {fix} "
                "(it computes only the new shards)")
    return (f"derived column {col.name} does not match the {kind} shards any more (the "
            f"embed stage redid or removed some since {col.stage} wrote it): {fix} (it "
            "recomputes only the shards that changed)")


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


class DerivedFiles:
    """Paths, manifest and parts of ``RUN/derived`` (the reader protocol of
    :class:`~.columns.ColumnReader`: ``dir``, ``shard_path``, ``check_shard``)."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.dir = run / "derived"
        self.manifest_path = self.dir / "manifest.json"
        self.trusted = False  # whether the manifest last read was sealed on this machine

    # ------------------------------------------------------------------ reading
    def columns(self) -> dict[str, DerivedColumn]:
        """The recorded derived columns by name ({} when none was written)."""
        path = no_links(self.run, self.manifest_path)
        if not os.path.lexists(path):
            return {}
        d = read_json(path, "derived columns manifest", REMEDY)
        if d.get("version") != VERSION:
            raise FormatError(f"{path} has version {d.get('version')}; this version reads "
                              f"{VERSION}: {REMEDY}")
        self.trusted = seal.check(d, path, "derived columns manifest", REMEDY)
        try:
            return {check_name(n, "column"): DerivedColumn(
                n, dict(c["spec"]), str(c["stage"]), str(c["model"]),
                [DerivedPart(**p) for p in c["parts"]]) for n, c in d["columns"].items()}
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise FormatError(f"derived columns manifest {path} is corrupt "
                              f"({type(e).__name__}: {e}): {REMEDY}") from None

    def shard_path(self, record: DerivedPart) -> Path:
        return confined(self.dir, record.file, "derived column part", root=self.run,
                        source=self.manifest_path, remedy=REMEDY)

    def check_shard(self, record: DerivedPart, full: bool = True) -> Path:
        path = self.shard_path(record)
        check_file(path, vars(record), "derived column part", REMEDY, full=full)
        return path

    def reader(self, col: DerivedColumn, verify: bool = True) -> ColumnReader:
        """Streaming and point reads of ``col``'s parts (rows as the embed shards')."""
        return ColumnReader(self, col.parts, EMPTY, verify)

    def attach(self, manifest: Any, make: Callable[[str, dict[str, Any], bool], Any]) -> Any:
        """``manifest`` (the embed stage's) with the derived columns listed after its own
        and each one's staleness in ``derived``; ``make(name, spec, sealed)`` builds a
        column (the manifest's type, so this module never imports it)."""
        cols = self.columns()
        if not cols:
            return manifest
        sealed = manifest.trusted and self.trusted
        columns, stale = merge(manifest.columns, cols.values(), manifest.shards.__getitem__,
                               lambda n, c: make(n, c, sealed))
        return replace(manifest, columns=columns, derived={n: stale.get(n) for n in cols})

    def readers(self, manifest: Any, kind: str, verify: bool = True
                ) -> dict[str, ColumnReader | str]:
        """The readers of ``manifest``'s derived columns of ``kind`` (a stale one: the
        message refusing it)."""
        if not manifest.derived:
            return {}
        cols = self.columns()
        return {n: why or self.reader(cols[n], verify)
                for n, why in manifest.derived.items() if manifest.columns[n].kind == kind}

    # ------------------------------------------------------------------ writing
    def write_part(self, column: str, block: int, source: Any, vectors: np.ndarray,
                   dtype: str) -> DerivedPart:
        """Write the vectors of embed shard ``source`` (a record: file, rows, digest) as
        a new part file (a fresh name: a column being read is never overwritten)."""
        if len(vectors) != source.rows:
            raise ValueError(f"{len(vectors)} vectors for the {source.rows} rows of "
                             f"{source.file}")
        folder = make_dirs(self.run, self.dir / check_name(column, "column"))
        name = f"{column}/part-{block:05d}.{secrets.token_hex(4)}.parquet"
        table = pa.Table.from_arrays([vectors_to_arrow(vectors, dtype)], names=[column])
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", write_page_checksum=True,
                       use_dictionary=False, row_group_size=ROW_GROUP_ROWS)
        path = no_links(self.run, folder / name.split("/")[1])
        atomic_write_bytes(path, buf.getvalue())
        return DerivedPart(name, block, len(vectors), os.lstat(path).st_size,
                           digest_file(path), source.file, source.digest)

    def write(self, columns: Mapping[str, DerivedColumn]) -> None:
        """Replace the manifest (sealed), then remove the part files it no longer names."""
        make_dirs(self.run, self.dir)
        body = {"version": VERSION, "stage": "derived",
                "columns": {n: c.to_dict() for n, c in sorted(columns.items())}}
        atomic_write_json(no_links(self.run, self.manifest_path), seal.seal(body))
        self.clean()

    def put(self, col: DerivedColumn) -> None:
        """Record (or replace) one column, keeping the others."""
        self.write({**self.columns(), col.name: col})

    def remove(self, name: str) -> bool:
        """Forget column ``name`` and remove its parts; whether it was there."""
        cols = self.columns()
        if name not in cols:
            return False
        del cols[name]
        self.write(cols)
        return True

    # ------------------------------------------------------------------ upkeep
    def leftovers(self) -> list[Path]:
        """Part files and column folders no manifest entry names (a killed run's).  Nothing
        is listed while the manifest cannot be read (they may be its parts)."""
        folder = no_links(self.run, self.dir)
        if not folder.is_dir():
            return []
        try:
            cols = self.columns()
        except FormatError:
            return []
        named = {p.file for c in cols.values() for p in c.parts}
        out = []
        with os.scandir(folder) as it:
            subs = [e for e in it if e.is_dir(follow_symlinks=False)]
        for sub in subs:
            with os.scandir(sub.path) as it:
                out += [folder / sub.name / e.name for e in it
                        if e.name.endswith(".parquet") and not e.name.startswith(".")
                        and e.is_file(follow_symlinks=False)
                        and f"{sub.name}/{e.name}" not in named]
        return sorted(out)

    def clean(self) -> list[Path]:
        found = self.leftovers()
        for path in found:
            path.unlink(missing_ok=True)
        for sub in {p.parent for p in found}:
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()
        return found

    def verify(self) -> list[str]:
        """Every bad or missing part (size and digest)."""
        try:
            cols = self.columns()
        except FormatError as e:
            return [str(e)]
        problems = []
        for col in cols.values():
            for part in col.parts:
                try:
                    self.check_shard(part)
                except FormatError as e:
                    problems.append(str(e))
        return problems


def merge(own: Mapping[str, Any], derived: Iterable[DerivedColumn],
          shards: Callable[[str], Sequence[Any]],
          make: Callable[[str, dict[str, Any]], Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The run's columns with the derived ones after them (``make(name, spec)`` builds a
    column), and the reason each stale one cannot be read.  A derived column may not
    shadow a column of the embed stage."""
    columns, stale = dict(own), {}
    identities = {n: c.provenance.identity() for n, c in own.items()}
    for col in derived:
        if col.name in own:
            raise FormatError(f"derived column {col.name} has the name of a column of the "
                              f"embed stage: {REMEDY}")
        columns[col.name] = make(col.name, col.spec)
        why = stale_reason(col, shards(columns[col.name].kind), identities)
        if why:
            stale[col.name] = why
    return columns, stale
