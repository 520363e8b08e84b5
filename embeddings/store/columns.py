"""Streaming reads of the embed shards: a column in bounded chunks, given rows from only
the shards that hold them, ids to rows, filter masks.

Row ``r`` of a kind (images | captions) is row ``r - starts[s]`` of shard ``s``, where
``starts`` is the running sum of the manifest's shard row counts (:class:`RowOffsets`);
nothing else maps rows to files.  Whole-shard streams check the shard's digest first (it
covers every byte; 2.5% of a read); point lookups read a few columns of a few shards and
check the Parquet page CRCs of the pages they read (the shard writer writes them) instead
of hashing whole shards, so a search that reads 10 rows never hashes gigabytes.

Vectors come out in the stored dtype as zero-copy views of the Arrow buffers of one
record batch: no per-row copies, no float32 detour (a caller converts a chunk when it
needs to).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import FormatError
from . import pages
from .hits import HIT_FIELDS, checked
from .offsets import SLICE_MAX, Chunk, RowOffsets, take

__all__ = ["Chunk", "ColumnReader", "ColumnSource", "RowOffsets", "take"]


class Shards(Protocol):
    """What the reader needs of :class:`~.embed.EmbedFiles` (no import: no cycle)."""

    dir: Path

    def shard_path(self, record: Any) -> Path: ...

    def check_shard(self, record: Any, full: bool = True) -> Path: ...

CHUNK_ROWS = 65_536  # rows per streamed chunk: 64 MiB at 512-d float16
PAGE_ROWS = 8  # vectors read from their pages (see pages); more: through their row groups
POINT_BATCH = 1024  # rows decoded at a time when reading a row group's prefix
GROUP_CACHE_BYTES = 64 * 2**20  # decoded row groups a reader keeps for point reads
REMEDY = "run `python -m pipeline verify RUN`, then rerun `python -m pipeline embed` to redo it"


def _vectors(array: pa.Array, dim: int, where: Path) -> np.ndarray:
    """A fixed-size-list column as an ``(n, dim)`` zero-copy view of its values."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    flat = array.flatten()  # honours the slice offset, unlike .values
    if flat.null_count or len(flat) != len(array) * dim:
        raise FormatError(f"shard {where} holds missing or misshapen vectors: {REMEDY}")
    return flat.to_numpy(zero_copy_only=True).reshape(len(array), dim)


class ColumnReader:
    """Reads of one run's shards of one kind; picklable (Ray tasks take one).

    ``derived``: columns kept in their own files, one part per shard (:mod:`.derived`),
    read through their own reader (or, for a stale one, the message refusing it)."""

    def __init__(self, files: Shards, records: Sequence[Any], schema: pa.Schema,
                 verify: bool = True, kind: str | None = None, hits: Any = None,
                 derived: Mapping[str, ColumnReader | str] | None = None) -> None:
        self.files = files
        self.schema = schema  # the kind's metadata fields
        self.verify = verify
        self.kind = kind
        self.hits = hits  # the run's hit tables (:mod:`.hits`), used where current
        self.derived = dict(derived or {})
        self.offsets = RowOffsets(records)
        self._groups: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # Ray tasks get the reader, not its cache
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_groups", "_lock", "hits")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _groups=OrderedDict(), _lock=threading.Lock(), hits=None)

    def hit_table(self, shard: int, columns: Sequence[str] = ()) -> pa.Table | None:
        """The shard's memory-mapped hit table when it is current and holds ``columns``."""
        if self.hits is None or self.kind is None or \
                not set(columns) <= set(HIT_FIELDS[self.kind].names):
            return None
        return self.hits.table(self.kind, self.records[shard])

    @property
    def records(self) -> tuple[Any, ...]:
        return self.offsets.records

    def _open(self, shard: int, digest: bool, point: bool = False) -> pq.ParquetFile:
        """The shard's Parquet reader; ``point``: for a point read, whose footer is parsed
        once and kept (5 ms of each "more like this" query otherwise, at load 5)."""
        rec = self.records[shard]
        path = self.files.check_shard(rec, full=digest and self.verify)
        key = ("meta", shard)
        with self._lock:
            meta = self._groups.get(key) if point and not digest else None
        try:
            # Buffered reads, no pre-buffering: a row group's pages are read as decoded
            # instead of the whole column chunk at once (half the reader's memory).
            pf = pq.ParquetFile(path, page_checksum_verification=not digest,
                                buffer_size=1 << 20, pre_buffer=False, metadata=meta)
        except (OSError, pa.ArrowException) as e:
            raise FormatError(f"shard {path} is corrupt ({e}): {REMEDY}") from None
        if point and meta is None and not digest:
            with self._lock:
                self._groups[key] = pf.metadata
        return pf

    def _derived(self, column: str) -> ColumnReader | None:
        got = self.derived.get(column)
        if isinstance(got, str):
            raise FormatError(got)
        return got

    def iter_column(self, column: str, dim: int, chunk_rows: int = CHUNK_ROWS,
                    shards: Sequence[int] | None = None) -> Iterator[Chunk]:
        """``column`` shard by shard, in chunks of at most ``chunk_rows`` rows."""
        if (other := self._derived(column)) is not None:
            yield from other.iter_column(column, dim, chunk_rows, shards)
            return
        for s in range(len(self.records)) if shards is None else shards:
            pf = self._open(s, digest=True)
            path = self.files.shard_path(self.records[s])
            pos = int(self.offsets.starts[s])
            try:
                # One decoding thread: a column is one stream, and each thread of the pool
                # would keep its own allocator cache (tens of MB at small budgets).
                for batch in pf.iter_batches(batch_size=chunk_rows, columns=[column],
                                             use_threads=False):
                    v = _vectors(batch.column(0), dim, path)
                    yield Chunk(pos, v, s)
                    pos += len(v)
            except (OSError, pa.ArrowException) as e:
                raise FormatError(f"shard {path} is corrupt ({e}): {REMEDY}") from None
            if pos != self.offsets.starts[s + 1]:
                raise FormatError(f"shard {path} holds {pos - self.offsets.starts[s]} rows, "
                                  f"the manifest {self.records[s].rows}: {REMEDY}")

    def names(self, shard: int) -> list[str]:
        """The column names of one shard (older shards lack newer optional columns)."""
        return list(self._open(shard, digest=False).schema_arrow.names)

    def read_shard(self, shard: int, columns: Sequence[str], threads: bool = True
                   ) -> pa.Table:
        """``columns`` of one whole shard (page checksums verified); ``threads``: decode
        columns in parallel (each thread keeps its own allocator cache: tens of MB)."""
        pf = self._open(shard, digest=False)
        try:
            return pf.read(columns=list(columns), use_threads=threads)
        except (OSError, pa.ArrowException) as e:
            path = self.files.shard_path(self.records[shard])
            raise FormatError(f"shard {path} is corrupt ({e}): {REMEDY}") from None

    def read_rows(self, rows: Sequence[int] | np.ndarray, columns: Sequence[str]) -> pa.Table:
        """``columns`` of the given global rows, in the order asked, reading only the row
        groups that hold them (a few recent groups are kept: ``GROUP_CACHE_BYTES``)."""
        if any(c in self.derived for c in columns):
            return self._read_derived(rows, columns)
        rows = np.asarray(rows, dtype=np.int64)
        target = self._schema(columns)
        hit_names = HIT_FIELDS[self.kind].names if self.kind else self.schema.names
        parts, where = [], []
        for s, pos, local in self.offsets.groups(rows):
            hits = self.hit_table(s, columns)
            if hits is not None:
                parts.append(checked(hits, local).select(list(columns)))
                where.append(pos)
                continue
            stored = [c for c in columns if c in self.schema.names or c not in hit_names]
            pf: pq.ParquetFile | None = None
            starts = self._group_starts(s)
            group = np.searchsorted(starts, local, side="right") - 1
            for g in np.unique(group):
                key = (s, int(g), tuple(stored))
                with self._lock:
                    table = self._groups.get(key)
                    if table is not None:
                        self._groups.move_to_end(key)
                mine = group == g
                if table is None:
                    pf = pf or self._open(s, digest=False, point=True)
                    few = int(mine.sum()) <= SLICE_MAX
                    upto = int(local[mine].max() - starts[g]) + 1 if few else None
                    table = self._read_group(s, pf, int(g), stored, upto)
                    if not few:
                        self._keep(key, table)
                part = take(table, local[mine] - starts[g])
                for c in columns:  # hit-table-only fields (a caption's image path): null
                    if c not in stored:
                        part = part.append_column(target.field(c),
                                                  pa.nulls(part.num_rows, target.field(c).type))
                parts.append(part.select(list(columns)))
                where.append(pos[mine])
        if not parts:
            return pa.Table.from_batches([], schema=target)
        table = pa.concat_tables([p.replace_schema_metadata(None) for p in parts])
        back = np.empty(len(rows), dtype=np.int64)
        back[np.concatenate(where)] = np.arange(len(rows))
        return take(table, back)

    def _read_derived(self, rows: Sequence[int] | np.ndarray,
                      columns: Sequence[str]) -> pa.Table:
        own = [c for c in columns if c not in self.derived]
        got = dict(zip(own, self.read_rows(rows, own).columns)) if own else {}
        for c in columns:
            if c not in got:
                got[c] = self._derived(c).read_rows(rows, [c]).column(0)  # type: ignore[union-attr]
        return pa.table([got[c] for c in columns], names=list(columns))

    def keep_footer(self, shard: int) -> None:
        """Parse and keep the shard's footer now (``serve`` does it in the background),
        so the first point read there does not (10 ms a shard when cold)."""
        self._group_starts(shard)

    def _footer(self, shard: int) -> Any:
        """The shard's parsed footer, kept (a reader built on it still costs 7 ms: the
        Arrow schema with the shard's metadata is rebuilt)."""
        with self._lock:
            meta = self._groups.get(("meta", shard))
        return meta if meta is not None else self._open(shard, digest=False, point=True).metadata

    def _group_starts(self, shard: int) -> np.ndarray:
        key = ("starts", shard)
        with self._lock:
            got = self._groups.get(key)
        if got is None:
            meta = self._footer(shard)
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            got = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            with self._lock:
                self._groups[key] = got
        return got

    def _read_group(self, shard: int, pf: pq.ParquetFile, group: int,
                    columns: Sequence[str], upto: int | None = None) -> pa.Table:
        """A row group's ``columns``; with ``upto``, only its first ``upto`` rows, decoded
        page by page and stopped there (one vector of a 16,384-row group: 0.03-0.04 s
        to row 2,000 against 0.4-0.5 s for the whole group, cold, on a loaded machine)."""
        try:
            if upto is None:
                return pf.read_row_group(group, columns=list(columns))
            batches, n = [], 0
            for batch in pf.iter_batches(batch_size=POINT_BATCH, row_groups=[group],
                                         columns=list(columns), use_threads=False):
                batches.append(batch)
                n += len(batch)
                if n >= upto:
                    break
            return pa.Table.from_batches(batches)
        except (OSError, pa.ArrowException) as e:
            path = self.files.shard_path(self.records[shard])
            raise FormatError(f"shard {path} is corrupt ({e}): {REMEDY}") from None

    def _keep(self, key: tuple[Any, ...], table: pa.Table) -> None:
        with self._lock:
            self._groups[key] = table
            held = sum(t.nbytes for t in self._groups.values() if isinstance(t, pa.Table))
            while held > GROUP_CACHE_BYTES and len(self._groups) > 1:
                old_key, old = next((k, v) for k, v in self._groups.items()
                                    if isinstance(v, pa.Table))
                if old_key == key:
                    break
                del self._groups[old_key]
                held -= old.nbytes

    def read_vectors(self, column: str, dim: int, rows: Sequence[int] | np.ndarray
                     ) -> np.ndarray:
        """The vectors of the given rows (stored dtype), in the order asked; a few rows
        from the pages that hold them (:mod:`.pages`), more through their row groups."""
        if 0 < len(rows) <= PAGE_ROWS and column not in self.derived:
            got = self._page_rows(column, dim, np.asarray(rows, dtype=np.int64))
            if got is not None:
                return got
        col = self.read_rows(rows, [column]).column(0)
        if len(col) == 0:
            return np.empty((0, dim), dtype=np.float16)
        return np.array(_vectors(col, dim, self.files.dir))

    def _page_rows(self, column: str, dim: int, rows: np.ndarray) -> np.ndarray | None:
        if rows.min() < 0 or rows.max() >= self.offsets.total:
            return None  # the row-group path says what is wrong
        out: list[np.ndarray | None] = [None] * len(rows)
        for s, pos, local in self.offsets.groups(rows):
            path = self.files.check_shard(self.records[s], full=False)
            starts = self._group_starts(s)
            for p, r in zip(pos.tolist(), local.tolist()):
                g = int(np.searchsorted(starts, r, side="right") - 1)
                key = ("pages", s, g, column)
                with self._lock:
                    chunk = self._groups.get(key, False)
                if chunk is False:
                    chunk = pages.chunk_of(path, self._footer(s), g, column, dim)
                    with self._lock:
                        self._groups[key] = chunk
                if chunk is None:
                    return None
                try:
                    out[p] = pages.read_row(path, chunk, r - int(starts[g]), dim)
                except (OSError, ValueError) as e:
                    raise FormatError(f"shard {path} is corrupt ({e}): {REMEDY}") from None
                if out[p] is None:
                    return None
        return np.stack(out)  # type: ignore[arg-type]

    def find_ids(self, ids: Sequence[str], shards: Sequence[int] | None = None
                 ) -> dict[str, int]:
        """Global row of each of ``ids`` found (shard by shard, stopping once all are):
        a binary search of a shard's hit table where it has one, else a scan of its ids."""
        import pyarrow.compute as pc

        wanted = list(dict.fromkeys(ids))
        want: pa.Array | None = None
        found: dict[str, int] = {}
        for s in range(len(self.records)) if shards is None else shards:
            hits = self.hit_table(s, ["id"])
            if hits is not None:
                rest = [i for i in wanted if i not in found]
                start = int(self.offsets.starts[s])
                for i, r in self.hits.find(hits, rest).items():
                    found.setdefault(i, start + r)
                if len(found) == len(wanted):
                    break
                continue
            col = self.read_shard(s, ["id"]).column(0)
            if want is None:
                want = pa.array(wanted, pa.string())
            hit = pc.is_in(col, value_set=want)
            for i in np.flatnonzero(hit.to_numpy(zero_copy_only=False)):
                found.setdefault(col[int(i)].as_py(), int(self.offsets.starts[s] + i))
            if len(found) == len(wanted):
                break
        return found

    def mask(self, split: str | None = None, label: str | None = None,
             shards: Sequence[int] | None = None) -> np.ndarray:
        """Bool per row (of ``shards``, default all): the row's split is ``split`` and
        ``label`` is its label or one of its labels (None: no condition).  Arrow compute,
        one shard at a time."""
        import pyarrow.compute as pc

        shards = range(len(self.records)) if shards is None else shards
        sizes = [int(self.records[s].rows) for s in shards]
        out = np.ones(sum(sizes), dtype=bool)
        names = (["split"] if split is not None else []) + (
            ["label", "labels"] if label is not None else [])
        if not names:
            return out
        lo = 0
        for s, size in zip(shards, sizes):
            t = self.read_shard(s, names)
            keep = np.ones(size, dtype=bool)
            if split is not None:
                keep &= _true(pc.equal(t.column("split"), split))
            if label is not None:
                one = _true(pc.equal(t.column("label"), label))
                lists = t.column("labels").combine_chunks()
                inner = _true(pc.equal(pc.list_flatten(lists), label))
                parents = pc.list_parent_indices(lists).to_numpy()
                one[parents[inner]] = True
                keep &= one
            out[lo:lo + size] = keep
            lo += size
        return out

    def distinct(self, column: str, shards: Sequence[int] | None = None) -> list[str]:
        """Sorted distinct non-empty values of a string column (of ``shards``)."""
        import pyarrow.compute as pc

        seen: set[str] = set()
        for s in range(len(self.records)) if shards is None else shards:
            col = self.read_shard(s, [column]).column(0)
            seen.update(v for v in pc.unique(col).to_pylist() if v)
        return sorted(seen)

    def _schema(self, columns: Sequence[str]) -> pa.Schema:
        fields = {f.name: f for f in (HIT_FIELDS[self.kind] if self.kind else self.schema)}
        return pa.schema([fields.get(c, pa.field(c, pa.list_(pa.float16()))) for c in columns])


def _true(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A boolean Arrow result as numpy, nulls counted as false."""
    import pyarrow.compute as pc

    return np.asarray(pc.fill_null(values, False).to_numpy(zero_copy_only=False), dtype=bool)


class ColumnSource:
    """One embedding column as the index builders read it: ``(first row, vectors)`` per
    chunk, shard by shard (picklable: Ray tasks read their own shards)."""

    def __init__(self, reader: ColumnReader, column: str, dim: int) -> None:
        self.reader, self.column, self.dim = reader, column, dim
        self.shard_rows = [int(r.rows) for r in reader.records]

    def chunks(self, shards: Sequence[int] | None = None,
               chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        for chunk in self.reader.iter_column(self.column, self.dim, chunk_rows, shards):
            yield chunk.start, chunk.vectors
