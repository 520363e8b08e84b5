"""The embed stage's files: Parquet shards, their manifest, the rejects and the run lock.

Block ``k`` of the input (see :mod:`embeddings.ingest`) becomes ``images/part-k`` and
``captions/part-k``; each shard lists in its Parquet key-value metadata the input ids it
covers and the items it rejected, so it is self-contained and appears by one atomic
rename (its format: :mod:`.shards`).  The manifest, written last, records every shard
with its size and digest.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import FormatError
from ..limits import DEFAULT_MAX_PIXELS
from . import seal
from .columns import CHUNK_ROWS, Chunk, ColumnReader, ColumnSource
from .derived import DerivedFiles
from .files import (
    atomic_write_bytes,
    atomic_write_json,
    check_file,
    confined,
    digest_file,
    make_dirs,
    no_links,
    read_json,
    tampered,
)
from .hits import HitTables
from .provenance import Provenance
from .shards import FIELDS, META_KEY, ShardInfo, shard_file

SCHEMA_VERSION = 2
KINDS = ("images", "captions")
MODALITY_KIND = {"image": "images", "text": "captions"}
SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")
REMEDY = "run `python -m pipeline verify RUN`, then rerun `python -m pipeline embed` to redo it"


def column_name(encoder: str, modality: str) -> str:
    """The one place an embedding column is named: ``<encoder>_<modality>``."""
    return f"{encoder}_{modality}"


@dataclass(frozen=True)
class Column:
    """An embedding column: which rows it belongs to and the model that made it."""

    name: str
    kind: str  # images | captions
    encoder: str
    modality: str  # image | text
    dtype: str
    provenance: Provenance
    # Read from a file sealed on this machine: its local model may be loaded (not saved).
    trusted: bool = field(default=False, compare=False)

    @property
    def dim(self) -> int:
        return self.provenance.dim

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "encoder": self.encoder, "modality": self.modality,
                "dtype": self.dtype, "provenance": self.provenance.to_dict()}

    @classmethod
    def from_dict(cls, name: str, d: Any, where: str, trusted: bool = False) -> Column:
        try:
            return cls(name, d["kind"], d["encoder"], d["modality"], d["dtype"],
                       Provenance.from_dict(d["provenance"], f"{where}: column {name}"),
                       trusted)
        except (KeyError, TypeError):
            raise FormatError(f"{where}: column {name!r} is incomplete") from None


@dataclass(frozen=True)
class ShardRecord:
    """One finished shard as the manifest records it."""

    file: str  # relative to RUN/embed
    block: int
    rows: int
    inputs: int
    rejects: int
    bytes: int
    digest: str


@dataclass(frozen=True)
class EmbedManifest:
    dataset: dict[str, Any]
    config: dict[str, Any]
    columns: dict[str, Column]
    shards: dict[str, list[ShardRecord]]
    rejects: dict[str, Any]
    versions: dict[str, str]
    updated: str
    trusted: bool = field(default=False, compare=False)  # sealed on this machine
    # Derived columns (:mod:`.derived`, listed in ``columns`` after the embed stage's):
    # name -> why it cannot be read now (None: it can).
    derived: dict[str, str | None] = field(default_factory=dict, compare=False)

    @property
    def own_columns(self) -> dict[str, Column]:
        """The columns the embed stage wrote (without the derived ones)."""
        return {n: c for n, c in self.columns.items() if n not in self.derived}

    @property
    def root(self) -> Path:
        """The dataset root the image paths of the rows are relative to."""
        return Path(self.dataset["root"])

    @property
    def image_source(self) -> dict[str, Any]:
        """Where the images are read (an image source's description: kind, root, ...);
        runs from before sources were recorded read files under the root."""
        d = self.dataset.get("image_source")
        return dict(d) if isinstance(d, dict) else {"kind": "files", "root": str(self.root)}

    @property
    def sidecar(self) -> dict[str, Any] | None:
        """img2dataset accounting summed over the shards, when the input had sidecars."""
        d = self.dataset.get("sidecar")
        return dict(d) if isinstance(d, dict) else None

    @property
    def max_pixels(self) -> int:
        return int(self.config.get("max_pixels", DEFAULT_MAX_PIXELS))

    def column(self, name: str) -> Column:
        if name not in self.columns:
            raise FormatError(f"no embedding column {name!r}; this run has {sorted(self.columns)}")
        return self.columns[name]

    def rows(self, kind: str) -> int:
        return sum(s.rows for s in self.shards[kind])

    def reject_counts(self) -> dict[str, int]:
        """Skipped items by reason class."""
        return dict(self.rejects.get("by_reason", {}))

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "stage": "embed", "complete": True,
                "updated": self.updated, "dataset": self.dataset, "config": self.config,
                "columns": {n: c.to_dict() for n, c in self.own_columns.items()},
                "rows": {k: self.rows(k) for k in KINDS},
                "shards": {k: [vars(s) for s in v] for k, v in self.shards.items()},
                "rejects": self.rejects, "versions": self.versions}


@dataclass(frozen=True)
class RunIdentity:
    """What a run was made with (``RUN/embed/config.json``): what must not change within it."""

    spec: dict[str, Any]  # dataset, encoder names and types, dtype, shard size, pixel limit
    columns: dict[str, Column]
    trusted: bool = field(default=False, compare=False)  # sealed on this machine

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "columns": {n: c.to_dict() for n, c in self.columns.items()}}


class EmbedFiles:
    """Paths and readers of ``RUN/embed``; every stage goes through this, never a path."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.dir = run / "embed"
        self.manifest_path = self.dir / "manifest.json"
        self.spec_path = self.dir / "config.json"
        self.rejects_path = self.dir / "rejects.jsonl"
        self.hits = HitTables(self, run / "index" / "hits")  # written by the index stage
        self.derived = DerivedFiles(run)

    def _checked(self, path: Path) -> Path:
        return no_links(self.run, path)

    # ------------------------------------------------------------------ writing
    def write_shard(self, kind: str, block: int, data: bytes) -> ShardRecord:
        """Write one shard atomically; its record (size, digest) for the manifest."""
        name = shard_file(kind, block)
        make_dirs(self.run, self.dir / kind)
        path = self._checked(self.dir / name)
        atomic_write_bytes(path, data)
        info = self.shard_info(path)
        n_rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
        return ShardRecord(name, block, n_rows, len(info.inputs), len(info.rejects), len(data),
                           digest_file(path))

    def read_identity(self) -> RunIdentity | None:
        path = self._checked(self.spec_path)
        if not os.path.lexists(path):
            return None
        remedy = f"delete {self.dir} to start over"
        d = read_json(path, "run identity file", remedy)
        trusted = seal.check(d, path, "run identity file", remedy)
        try:
            return RunIdentity(dict(d["spec"]), {
                n: Column.from_dict(n, c, str(path), trusted)
                for n, c in d["columns"].items()}, trusted)
        except (KeyError, TypeError, AttributeError, ValueError):
            raise FormatError(f"run identity file {path} is corrupt: {remedy}") from None

    def write_identity(self, identity: RunIdentity) -> None:
        make_dirs(self.run, self.dir)
        atomic_write_json(self._checked(self.spec_path), seal.seal(identity.to_dict()))

    def write_manifest(self, manifest: EmbedManifest, rejects: Iterable[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
        make_dirs(self.run, self.dir)
        atomic_write_bytes(self._checked(self.rejects_path), lines.encode())
        self._write_manifest(manifest)  # last: the run is done

    def _write_manifest(self, manifest: EmbedManifest) -> None:
        atomic_write_json(self._checked(self.manifest_path), seal.seal(manifest.to_dict()))

    def withdraw(self, blocks: Iterable[int]) -> None:
        """Drop ``blocks`` from the manifest before they are written again: readers never
        meet a listed shard being replaced (they see the run without them meanwhile)."""
        gone = set(blocks)
        m = self.manifest() if gone and self.has_manifest() else None
        if m is not None and any(r.block in gone for k in KINDS for r in m.shards[k]):
            self._write_manifest(replace(m, shards={
                k: [r for r in m.shards[k] if r.block not in gone] for k in KINDS}))

    def discard(self, rejects: Iterable[dict[str, Any]]) -> None:
        """Remove every shard, the identity and the manifest, keeping only ``rejects``
        (a run in which nothing could be embedded starts afresh next time)."""
        make_dirs(self.run, self.dir)
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
        atomic_write_bytes(self._checked(self.rejects_path), lines.encode())
        for path in (self.manifest_path, self.spec_path):
            self._checked(path).unlink(missing_ok=True)
        for kind in KINDS:
            for path in self.shard_files(kind).values():
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ scanning
    def shard_files(self, kind: str) -> dict[int, Path]:
        """Shard files on disk by block number (finished or not yet in the manifest); a
        link among them, or a linked folder, is refused (:class:`Tampered`)."""
        folder = self._checked(self.dir / kind)
        out = {}
        if folder.is_dir():
            with os.scandir(folder) as entries:
                for e in entries:
                    m = SHARD_RE.match(e.name)
                    if not m:
                        continue
                    if e.is_symlink():
                        raise tampered(folder / e.name)
                    if e.is_file(follow_symlinks=False):
                        out[int(m.group(1))] = folder / e.name
        return dict(sorted(out.items()))

    def verify_shard(self, kind: str, block: int,
                     recorded: Mapping[str, ShardRecord]) -> ShardRecord:
        """The record of a shard on disk, checked against the manifest's record when there
        is one, else read through (page checksums) and described afresh."""
        name = shard_file(kind, block)
        if name in recorded:
            self.check_shard(recorded[name])
            return recorded[name]
        path = self._checked(self.dir / name)
        info = self.shard_info(path)
        try:
            rows = pq.read_table(path, page_checksum_verification=True).num_rows
        except (OSError, pa.ArrowException) as e:
            raise FormatError(f"shard {path} is corrupt ({e})") from None
        return ShardRecord(name, block, rows, len(info.inputs), len(info.rejects),
                           os.lstat(path).st_size, digest_file(path))

    def shard_info(self, path: Path) -> ShardInfo:
        """The metadata of a shard file; FormatError naming it when unreadable."""
        try:
            meta = (pq.read_schema(self._checked(path)).metadata or {})[META_KEY]
            d = json.loads(meta)
            sidecar = d.get("sidecar")
            return ShardInfo(int(d["block"]), list(d["inputs"]), list(d["rejects"]),
                             dict(sidecar) if sidecar is not None else None)
        except (OSError, KeyError, ValueError, TypeError, RecursionError,
                pa.ArrowException) as e:
            raise FormatError(f"shard {path} is corrupt or not a shard of this tool "
                              f"({type(e).__name__}): {REMEDY}") from None

    # ------------------------------------------------------------------ reading
    def has_manifest(self) -> bool:
        return os.path.lexists(self._checked(self.manifest_path))

    def manifest(self) -> EmbedManifest:
        path = self._checked(self.manifest_path)
        if not os.path.lexists(path):
            raise FormatError(f"no embeddings in {self.run}: {path} is missing (run "
                              "`python -m pipeline embed` first)")
        remedy = "rerun `python -m pipeline embed` to rewrite it"
        d = read_json(path, "embed manifest", remedy)
        if d.get("schema_version") != SCHEMA_VERSION:
            raise FormatError(f"{path} has schema version {d.get('schema_version')}; this "
                              f"version reads {SCHEMA_VERSION}: embed into a new run "
                              "directory (--run) with this version")
        if not d.get("complete"):
            raise FormatError(f"the embed stage in {self.run} did not finish: rerun it to resume")
        trusted = seal.check(d, path, "embed manifest", remedy)
        try:
            where = str(path)
            m = EmbedManifest(
                dict(d["dataset"]), dict(d["config"]),
                {n: Column.from_dict(n, c, where, trusted) for n, c in d["columns"].items()},
                {k: [ShardRecord(**s) for s in d["shards"][k]] for k in KINDS},
                dict(d["rejects"]), dict(d["versions"]), str(d["updated"]), trusted)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise FormatError(f"embed manifest {path} is corrupt ({type(e).__name__}: {e}): "
                              f"{remedy}") from None
        where = str(self.derived.manifest_path)  # derived columns follow the embed stage's
        return self.derived.attach(m, lambda n, c, sealed: Column.from_dict(n, c, where,
                                                                            sealed))

    def shard_path(self, record: ShardRecord) -> Path:
        return confined(self.dir, record.file, "shard file", root=self.run,
                        source=self.manifest_path, remedy=REMEDY)

    def check_shard(self, record: ShardRecord, full: bool = True) -> Path:
        path = self.shard_path(record)
        check_file(path, vars(record), "shard", REMEDY, full=full)
        return path

    def _read(self, record: ShardRecord, columns: Sequence[str], verify: bool) -> pa.Table:
        path = self.check_shard(record, full=verify)
        try:
            # The file digest already covers every byte (2.5% of a read at 1M x 512);
            # verifying the page CRCs as well cost another 17%.
            return pq.read_table(path, columns=list(columns))
        except (OSError, pa.ArrowException) as e:
            raise FormatError(f"shard {path} is corrupt ({e}): {REMEDY}") from None

    def reader(self, kind: str, verify: bool = True) -> ColumnReader:
        """Streaming and point reads of the ``kind`` shards (:mod:`.columns`)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        m = self.manifest()
        return ColumnReader(self, m.shards[kind], FIELDS[kind], verify, kind, self.hits,
                            self.derived.readers(m, kind, verify))

    def iter_column(self, column: str, chunk_rows: int = CHUNK_ROWS, verify: bool = True,
                    shards: Sequence[int] | None = None) -> Iterator[Chunk]:
        """One column shard by shard in chunks of at most ``chunk_rows`` rows, in the
        stored dtype, each shard's digest checked before it is read (``shards``: only
        those, by position in the manifest)."""
        col = self.manifest().column(column)
        return self.reader(col.kind, verify).iter_column(column, col.dim, chunk_rows, shards)

    def source(self, column: str, verify: bool = True) -> ColumnSource:
        """``column`` as the index builders stream it (:class:`.columns.ColumnSource`)."""
        col = self.manifest().column(column)
        return ColumnSource(self.reader(col.kind, verify), column, col.dim)

    def read_vectors(self, column: str, dtype: type = np.float32,
                     verify: bool = True) -> np.ndarray:
        """All vectors of one column as one contiguous ``(n, dim)`` array, shard order
        (for small runs: large ones stream with :meth:`iter_column`)."""
        m = self.manifest()
        col = m.column(column)
        out = np.empty((m.rows(col.kind), col.dim), dtype=dtype)
        for chunk in self.iter_column(column, verify=verify):
            out[chunk.start:chunk.start + len(chunk.vectors)] = chunk.vectors
        return out

    def read_row(self, column: str, row: int) -> np.ndarray:
        """One stored vector (float32), read from the one shard that holds it."""
        col = self.manifest().column(column)
        reader = self.reader(col.kind)
        if not 0 <= row < reader.offsets.total:
            raise FormatError(f"row {row} is past the end of column {column}")
        return reader.read_vectors(column, col.dim, [row])[0].astype(np.float32)

    def read_table(self, kind: str, columns: Iterable[str] | None = None,
                   verify: bool = True) -> pa.Table:
        """Metadata columns (default: all non-embedding ones) of every ``kind`` row."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        names = list(columns) if columns is not None else FIELDS[kind].names
        tables = [self._read(r, names, verify) for r in self.manifest().shards[kind]]
        if not tables:
            return pa.Table.from_batches([], schema=FIELDS[kind]).select(names)
        return pa.concat_tables(tables)

    def iter_batches(self, kind: str, columns: Sequence[str],
                     verify: bool = True) -> Iterator[pa.Table]:
        """One table per shard, in order, so a large column never has to fit in memory."""
        for rec in self.manifest().shards[kind]:
            yield self._read(rec, columns, verify)
