"""The embed stage's files: Parquet shards, their manifest, the rejects and the run lock.

Block ``k`` of the input (see :mod:`embeddings.ingest`) becomes ``images/part-k`` and
``captions/part-k``; each shard lists in its Parquet key-value metadata the input ids it
covers and the items it rejected, so it is self-contained and appears by one atomic
rename.  The manifest, written last, records every shard with its size and digest.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import FormatError
from ..images import DEFAULT_MAX_PIXELS
from .columns import CHUNK_ROWS, Chunk, ColumnReader, ColumnSource
from .files import (
    atomic_write_bytes,
    atomic_write_json,
    check_file,
    confined,
    digest_file,
    read_json,
)
from .provenance import Provenance

SCHEMA_VERSION = 2
KINDS = ("images", "captions")
MODALITY_KIND = {"image": "images", "text": "captions"}
META_KEY = b"embeddings.shard"
SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")
REMEDY = "run `python -m pipeline verify RUN`, then rerun `python -m pipeline embed` to redo it"
IMAGE_FIELDS = pa.schema([("id", pa.string()), ("image", pa.string()), ("split", pa.string()),
                          ("label", pa.string()), ("labels", pa.list_(pa.string())),
                          ("captions", pa.list_(pa.string()))])
CAPTION_FIELDS = pa.schema([("id", pa.string()), ("image_id", pa.string()),
                            ("caption", pa.string()), ("split", pa.string()),
                            ("label", pa.string()), ("labels", pa.list_(pa.string()))])
FIELDS = {"images": IMAGE_FIELDS, "captions": CAPTION_FIELDS}
DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}
ROW_GROUP_ROWS = 16_384  # a reader holds about 4 row groups of a column: 64 MiB at 512-d


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

    @property
    def dim(self) -> int:
        return self.provenance.dim

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "encoder": self.encoder, "modality": self.modality,
                "dtype": self.dtype, "provenance": self.provenance.to_dict()}

    @classmethod
    def from_dict(cls, name: str, d: Any, where: str) -> Column:
        try:
            return cls(name, d["kind"], d["encoder"], d["modality"], d["dtype"],
                       Provenance.from_dict(d["provenance"], f"{where}: column {name}"))
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
class ShardInfo:
    """A shard's own key-value metadata: the block, the inputs covered, the rejects."""

    block: int
    inputs: list[str]
    rejects: list[dict[str, str]]
    sidecar: dict[str, Any] | None = None  # img2dataset accounting of a tar shard's block


@dataclass(frozen=True)
class EmbedManifest:
    dataset: dict[str, Any]
    config: dict[str, Any]
    columns: dict[str, Column]
    shards: dict[str, list[ShardRecord]]
    rejects: dict[str, Any]
    versions: dict[str, str]
    updated: str

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
                "columns": {n: c.to_dict() for n, c in self.columns.items()},
                "rows": {k: self.rows(k) for k in KINDS},
                "shards": {k: [vars(s) for s in v] for k, v in self.shards.items()},
                "rejects": self.rejects, "versions": self.versions}


@dataclass(frozen=True)
class RunIdentity:
    """What a run was made with (``RUN/embed/config.json``): what must not change within it."""

    spec: dict[str, Any]  # dataset, encoder names and types, dtype, shard size, pixel limit
    columns: dict[str, Column]

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "columns": {n: c.to_dict() for n, c in self.columns.items()}}


def shard_file(kind: str, block: int) -> str:
    return f"{kind}/part-{block:05d}.parquet"


def vectors_to_arrow(vectors: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    """A 2-D array as a fixed-size-list column, without going through Python lists."""
    np_type, pa_type = DTYPES[dtype]
    flat = np.ascontiguousarray(vectors, dtype=np_type).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa_type), vectors.shape[1])


def shard_bytes(kind: str, rows: pa.Table | Mapping[str, Sequence[Any]],
                vectors: Mapping[str, np.ndarray], dtype: str, info: ShardInfo,
                extra: pa.Table | None = None) -> bytes:
    """One shard as Parquet bytes (page checksums on: readers verify every page they read).

    ``rows``: the metadata columns of ``kind`` (a table, or lists by column name);
    ``extra``: more per-row columns (the image fingerprints, :mod:`.prints`)."""
    if isinstance(rows, pa.Table):
        arrays = [rows.column(f.name).combine_chunks().cast(f.type) for f in FIELDS[kind]]
    else:
        arrays = [pa.array(rows[f.name], type=f.type) for f in FIELDS[kind]]
    names = [f.name for f in FIELDS[kind]]
    if extra is not None:
        arrays += [c.combine_chunks() for c in extra.columns]
        names += extra.column_names
    for name, vec in vectors.items():
        if len(vec) != len(arrays[0]):
            raise ValueError(f"column {name}: {len(vec)} vectors for {len(arrays[0])} rows")
        arrays.append(vectors_to_arrow(vec, dtype))
        names.append(name)
    table = pa.Table.from_arrays(arrays, names=names)
    meta: dict[str, Any] = {"block": info.block, "inputs": info.inputs, "rejects": info.rejects}
    if info.sidecar is not None:
        meta["sidecar"] = info.sidecar
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    buf = io.BytesIO()
    # Dictionary encoding only pays on the metadata columns: on vectors it made reading
    # 3x slower (0.56 s vs 0.19 s for 20,000 x 512 float16) for no size gain.  Row groups
    # of ROW_GROUP_ROWS let readers stream a large shard a group at a time.
    pq.write_table(table, buf, compression="zstd", write_page_checksum=True,
                   use_dictionary=[f.name for f in FIELDS[kind]],
                   row_group_size=ROW_GROUP_ROWS)
    return buf.getvalue()


class EmbedFiles:
    """Paths and readers of ``RUN/embed``; every stage goes through this, never a path."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.dir = run / "embed"
        self.manifest_path = self.dir / "manifest.json"
        self.spec_path = self.dir / "config.json"
        self.rejects_path = self.dir / "rejects.jsonl"

    # ------------------------------------------------------------------ writing
    def write_shard(self, kind: str, block: int, data: bytes) -> ShardRecord:
        """Write one shard atomically; its record (size, digest) for the manifest."""
        name = shard_file(kind, block)
        path = self.dir / name
        atomic_write_bytes(path, data)
        info = self.shard_info(path)
        n_rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
        return ShardRecord(name, block, n_rows, len(info.inputs), len(info.rejects), len(data),
                           digest_file(path))

    def read_identity(self) -> RunIdentity | None:
        if not self.spec_path.exists():
            return None
        remedy = f"delete {self.dir} to start over"
        d = read_json(self.spec_path, "run identity file", remedy)
        try:
            return RunIdentity(dict(d["spec"]), {
                n: Column.from_dict(n, c, str(self.spec_path)) for n, c in d["columns"].items()})
        except (KeyError, TypeError, AttributeError, ValueError):
            raise FormatError(f"run identity file {self.spec_path} is corrupt: {remedy}") from None

    def write_identity(self, identity: RunIdentity) -> None:
        atomic_write_json(self.spec_path, identity.to_dict())

    def write_manifest(self, manifest: EmbedManifest, rejects: Iterable[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
        atomic_write_bytes(self.rejects_path, lines.encode())
        atomic_write_json(self.manifest_path, manifest.to_dict())  # last: the run is done

    # ------------------------------------------------------------------ scanning
    def shard_files(self, kind: str) -> dict[int, Path]:
        """Shard files on disk by block number (finished or not yet in the manifest)."""
        folder = self.dir / kind
        out = {}
        if folder.is_dir():
            for p in folder.iterdir():
                m = SHARD_RE.match(p.name)
                if m and p.is_file():
                    out[int(m.group(1))] = p
        return dict(sorted(out.items()))

    def verify_shard(self, kind: str, block: int,
                     recorded: Mapping[str, ShardRecord]) -> ShardRecord:
        """The record of a shard on disk, checked against the manifest's record when there
        is one, else read through (page checksums) and described afresh."""
        name = shard_file(kind, block)
        if name in recorded:
            self.check_shard(recorded[name])
            return recorded[name]
        path = self.dir / name
        info = self.shard_info(path)
        try:
            rows = pq.read_table(path, page_checksum_verification=True).num_rows
        except (OSError, pa.ArrowException) as e:
            raise FormatError(f"shard {path} is corrupt ({e})") from None
        return ShardRecord(name, block, rows, len(info.inputs), len(info.rejects),
                           path.stat().st_size, digest_file(path))

    def shard_info(self, path: Path) -> ShardInfo:
        """The metadata of a shard file; FormatError naming it when unreadable."""
        try:
            meta = (pq.read_schema(path).metadata or {})[META_KEY]
            d = json.loads(meta)
            sidecar = d.get("sidecar")
            return ShardInfo(int(d["block"]), list(d["inputs"]), list(d["rejects"]),
                             dict(sidecar) if sidecar is not None else None)
        except (OSError, KeyError, ValueError, TypeError, pa.ArrowException) as e:
            raise FormatError(f"shard {path} is corrupt or not a shard of this tool "
                              f"({type(e).__name__}): {REMEDY}") from None

    # ------------------------------------------------------------------ reading
    def has_manifest(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> EmbedManifest:
        path = self.manifest_path
        if not path.exists():
            raise FormatError(f"no embeddings in {self.run}: {path} is missing (run "
                              "`python -m pipeline embed` first)")
        d = read_json(path, "embed manifest", "rerun `python -m pipeline embed` to rewrite it")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise FormatError(f"{path} has schema version {d.get('schema_version')}; this "
                              f"version reads {SCHEMA_VERSION}: embed into a new run "
                              "directory (--run) with this version")
        if not d.get("complete"):
            raise FormatError(f"the embed stage in {self.run} did not finish: rerun it to resume")
        try:
            where = str(path)
            return EmbedManifest(
                dict(d["dataset"]), dict(d["config"]),
                {n: Column.from_dict(n, c, where) for n, c in d["columns"].items()},
                {k: [ShardRecord(**s) for s in d["shards"][k]] for k in KINDS},
                dict(d["rejects"]), dict(d["versions"]), str(d["updated"]))
        except (KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"embed manifest {path} is corrupt ({type(e).__name__}: {e}): "
                              "rerun `python -m pipeline embed` to rewrite it") from None

    def shard_path(self, record: ShardRecord) -> Path:
        return confined(self.dir, record.file, "shard file")

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
        return ColumnReader(self, self.manifest().shards[kind], FIELDS[kind], verify)

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

    def verify(self) -> list[str]:
        """Every problem of the embed files (missing, wrong size, wrong digest, unreadable)."""
        problems = []
        m = self.manifest()
        for kind in KINDS:
            for rec in m.shards[kind]:
                try:
                    self.check_shard(rec)  # size and digest cover every byte
                except FormatError as e:
                    problems.append(str(e))
        return problems
