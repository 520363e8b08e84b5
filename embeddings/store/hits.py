"""Hit tables: per embed shard, the metadata a search hit needs, memory-mapped.

A search hit needs a few metadata fields of a few rows.  Read from the Parquet shard,
each hit's shard costs a footer parse (megabytes: the shard's own key-value record lists
every input id) and a decoded row group; at tens of millions of rows that was seconds per
query.  A hit table holds the same rows' metadata fields (:data:`HIT_FIELDS`: the shard's
metadata columns; caption rows also the path of their image, found in the image shard of
the same block) in the shard's row order as an uncompressed Arrow IPC file with a footer
of a few hundred bytes, memory-mapped: a lookup touches the pages of the rows it reads.
An ``id_order`` column (the rows sorted by id) turns an id into its row by a binary
search instead of a scan of every shard's id column.

    RUN/index/hits/manifest.json                     sealed: per shard its table's record
    RUN/index/hits/<kind>.<block>.<token>.arrow      one table per embed shard

The index stage writes them (:meth:`HitTables.build`, under its lock) for every shard
that lacks a current one: a table is current when the manifest records it for the
shard's present digest and its own size and digest match.  A stale table (the shard was
redone) is ignored and rebuilt; a missing one is read from the Parquet shard instead
(runs indexed by older versions keep working); one that fails its checksum is refused
with the remedy (rerun the index stage, which rebuilds it) and listed by ``verify``.
Each file is checked whole (size, digest) once per reader before it is mapped.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import FormatError
from . import seal
from .files import (
    atomic_path,
    atomic_write_json,
    check_file,
    confined,
    file_record,
    make_dirs,
    no_links,
    read_json,
)
from .rowsum import row_digests
from .shards import FIELDS

SCHEMA_VERSION = 3  # 3: a checksum per row
ORDER = "id_order"  # row positions sorted by id (byte order): the id lookup
HIT_FIELDS = {"images": FIELDS["images"],
              "captions": FIELDS["captions"].append(pa.field("image", pa.string()))}
DIGEST = "row_digest"  # xxh3_64 of the row's fields (:func:`row_digests`)
SCHEMAS = {k: v.append(pa.field(ORDER, pa.int32())).append(pa.field(DIGEST, pa.uint64()))
           for k, v in HIT_FIELDS.items()}
REMEDY = "rerun `python -m pipeline index` (it rebuilds the hit tables)"
BISECT_MAX = 64  # ids looked up by binary search; more: one vectorised pass per table
MAPPED_MAX = 4096  # checked, mapped tables a process keeps (maps: only touched pages count)
_MAPPED: dict[tuple[Any, ...], pa.Table] = {}  # (path, digest, inode, size, mtime) -> table
_LOCK = threading.Lock()


class HitTables:
    """The hit tables of one run (``embed``: its :class:`~.embed.EmbedFiles`)."""

    def __init__(self, embed: Any, folder: Path) -> None:
        self.embed = embed
        self.run = embed.run
        self.folder = folder
        self.manifest_path = folder / "manifest.json"
        self._records: dict[str, dict[str, Any]] | None = None
        self._tables: dict[str, pa.Table] = {}  # file name -> table this reader mapped

    # ------------------------------------------------------------------ reading

    def records(self) -> dict[str, dict[str, Any]]:
        """``{kind: {shard file: record}}`` as the manifest has them ({} when none)."""
        if self._records is None:
            self._records = self._read_manifest()
        return self._records

    def _read_manifest(self) -> dict[str, dict[str, Any]]:
        path = no_links(self.run, self.manifest_path)
        if not os.path.lexists(path):
            return {}
        d = read_json(path, "hit table manifest", REMEDY)
        seal.check(d, path, "hit table manifest", REMEDY)
        kinds = d.get("kinds")
        if d.get("schema_version") != SCHEMA_VERSION:
            return {}  # another version's tables: read from the shards until rewritten
        if not isinstance(kinds, dict) or not all(isinstance(v, dict) for v in kinds.values()):
            raise FormatError(f"hit table manifest {path} is corrupt: {REMEDY}")
        return {k: dict(v) for k, v in kinds.items()}

    def record(self, kind: str, shard: Any) -> dict[str, Any] | None:
        """The manifest's record of the table of ``shard`` (a ShardRecord) when current."""
        rec = self.records().get(kind, {}).get(shard.file)
        if not isinstance(rec, dict) or rec.get("shard_digest") != shard.digest or \
                rec.get("rows") != shard.rows or not isinstance(rec.get("file"), str):
            return None
        return rec

    def table(self, kind: str, shard: Any, full: bool = False) -> pa.Table | None:
        """The memory-mapped hit table of ``shard``, None when it has no current one.

        Opening checks the file's size and structure; each row read is checked against its
        own checksum (:func:`checked`), so a search reading 10 rows never hashes 10 whole
        files.  ``full`` (the index stage, ``verify``): the whole file's digest too.
        FormatError naming the file when either fails."""
        rec = self.record(kind, shard)
        if rec is None:
            return None
        if not full and rec["file"] in self._tables:  # this reader mapped it already
            return self._tables[rec["file"]]
        path = self._path(rec["file"])
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        key = (str(path), rec["digest"], *((st.st_ino, st.st_size, st.st_mtime_ns)
                                           if st is not None else ()))
        with _LOCK:
            got = _MAPPED.get(key)
        check_file(path, rec, "hit table", REMEDY, full=full)
        if got is not None:
            self._tables[rec["file"]] = got
            return got
        try:
            table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        except (OSError, pa.ArrowException) as e:
            raise FormatError(f"hit table {path} is corrupt ({e}): {REMEDY}") from None
        if table.num_rows != shard.rows or not table.schema.equals(SCHEMAS[kind]):
            raise FormatError(f"hit table {path} does not match its shard: {REMEDY}")
        table = table.replace_schema_metadata({b"path": str(path).encode()})
        with _LOCK:
            _MAPPED[key] = table
            while len(_MAPPED) > MAPPED_MAX:
                _MAPPED.pop(next(iter(_MAPPED)))
        self._tables[rec["file"]] = table
        return table

    def _path(self, name: str) -> Path:
        return confined(self.folder, name, "hit table", root=self.run,
                        source=self.manifest_path, remedy=REMEDY)

    def find(self, table: pa.Table, ids: Sequence[str]) -> dict[str, int]:
        """Row within the table's shard of each of ``ids`` it holds."""
        col = table.column("id")
        if len(ids) > BISECT_MAX:
            import pyarrow.compute as pc

            hit = pc.index_in(pa.array(list(ids), pa.string()), value_set=col)
            found = {i: int(r) for i, r in zip(ids, hit.to_pylist()) if r is not None}
            checked(table, np.array(list(found.values()), np.int64))
            return found
        values = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        order = _ints(table.column(ORDER).chunk(0))
        at = _StringAt(values)
        found = {}
        try:
            for want in ids:
                key = want.encode()
                lo, hi = 0, len(order)
                while lo < hi:
                    mid = (lo + hi) // 2
                    if at(int(order[mid])) < key:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo < len(order) and at(int(order[lo])) == key:
                    found[want] = int(order[lo])
        except IndexError:  # an order pointing outside the table
            raise _corrupt(table) from None
        if found:
            checked(table, np.array(list(found.values()), np.int64))
        return found

    # ------------------------------------------------------------------ writing

    def missing(self, kind: str) -> list[int]:
        """Positions (in the embed manifest) of the ``kind`` shards without a sound,
        current table: stale, missing, or failing its checksum."""
        out = []
        for i, shard in enumerate(self.embed.manifest().shards[kind]):
            rec = self.record(kind, shard)
            try:
                ok = rec is not None and self.table(kind, shard, full=True) is not None
            except FormatError:
                ok = False
            if not ok:
                out.append(i)
        return out

    def build(self, kind: str, progress: Callable[[int, int], None] | None = None,
              save_every_s: float = 30.0) -> int:
        """Write a table for every ``kind`` shard lacking a current one (the caller holds
        the index lock); the number written.  ``progress(rows done, rows to do)``.  The
        manifest is saved as tables appear (at most every ``save_every_s``) so an
        interrupted build keeps what it wrote."""
        todo = self.missing(kind)
        if not todo:
            return 0
        shards = self.embed.manifest().shards[kind]
        total, done = sum(int(shards[s].rows) for s in todo), 0
        reader = self.embed.reader(kind)
        images = self.embed.reader("images") if kind == "captions" else None
        records = {k: dict(v) for k, v in self.records().items()}
        mine = records.setdefault(kind, {})
        saved = time.monotonic()
        for n, s in enumerate(todo, 1):
            table = reader.read_shard(s, FIELDS[kind].names, threads=False)
            if images is not None:
                table = table.append_column("image", _image_paths(images, shards[s], table))
            mine[shards[s].file] = {**self._write(kind, shards[s], table),
                                    "shard_digest": shards[s].digest, "rows": shards[s].rows}
            done += int(shards[s].rows)
            if progress is not None:
                progress(done, total)
            if time.monotonic() - saved > save_every_s or n == len(todo):
                self._save(records)
                saved = time.monotonic()
        return len(todo)

    def _write(self, kind: str, shard: Any, table: pa.Table) -> dict[str, Any]:
        import pyarrow.compute as pc

        order = pc.sort_indices(table.column("id"))  # byte order: what find() bisects
        table = table.replace_schema_metadata(None).combine_chunks()
        table = table.append_column(ORDER, order.cast(pa.int32())).append_column(
            DIGEST, pa.array(row_digests(table.select(HIT_FIELDS[kind].names)), pa.uint64()))
        block = Path(shard.file).stem.split("-")[-1]
        name = f"{kind}.{block}.{secrets.token_hex(4)}.arrow"
        make_dirs(self.run, self.folder)
        path = no_links(self.run, self.folder / name)
        with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, \
                pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=max(1, table.num_rows))
        return file_record(path, name)

    def _save(self, records: dict[str, dict[str, Any]]) -> None:
        make_dirs(self.run, self.folder)
        atomic_write_json(no_links(self.run, self.manifest_path), seal.seal({
            "schema_version": SCHEMA_VERSION, "stage": "index",
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kinds": records}))
        self._records = records
        self.clean()  # the tables these replaced (stale, or failing their checksum)

    # ------------------------------------------------------------------ upkeep

    def leftovers(self) -> list[Path]:
        """Tables the manifest does not name, or names for shards the embed manifest no
        longer lists (redone or gone); nothing while either manifest cannot be read."""
        folder = no_links(self.run, self.folder)
        if not folder.is_dir():
            return []
        try:
            records = self._read_manifest()
            shards = self.embed.manifest().shards
        except FormatError:
            return []
        keep = {r.get("file") for kind, recs in records.items() for f, r in recs.items()
                if any(s.file == f and s.digest == r.get("shard_digest")
                       for s in shards.get(kind, []))}
        return sorted(folder / e.name for e in os.scandir(folder)
                      if e.name.endswith(".arrow") and not e.name.startswith(".")
                      and e.name not in keep and e.is_file(follow_symlinks=False))

    def clean(self) -> list[Path]:
        found = self.leftovers()
        for path in found:
            path.unlink(missing_ok=True)
        return found

    def verify(self) -> list[str]:
        """Every table the manifest names for a current shard, checked whole."""
        problems = []
        try:
            shards = self.embed.manifest().shards
            for kind, recs in self.records().items():
                for shard in shards.get(kind, []):
                    if shard.file in recs:
                        try:
                            self.table(kind, shard, full=True)
                        except FormatError as e:
                            problems.append(str(e))
        except FormatError as e:
            problems.append(str(e))
        return problems


def checked(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """Rows ``rows`` of a hit table (all its fields), each checked against its checksum
    (reading only its own bytes, offsets checked to stay inside their buffers) before
    any value is converted: FormatError naming the file when one fails."""
    try:
        parts = [table.slice(int(r), 1) for r in rows]  # bounds: checked by row_digests
        got = pa.concat_tables(parts) if parts else table.slice(0, 0)
        fields = got.schema.names[:got.schema.get_field_index(ORDER)]
        want = [v for c in got.column(DIGEST).chunks for v in _uints(c)]
        ok = np.array_equal(np.concatenate([row_digests(p.select(fields)) for p in parts])
                            if parts else np.zeros(0, np.uint64), np.array(want, np.uint64))
    except (pa.ArrowException, UnicodeDecodeError, ValueError, IndexError):
        ok = False
    if not ok or len(got) != len(rows):
        raise _corrupt(table)
    return got


def _corrupt(table: pa.Table) -> FormatError:
    path = (table.schema.metadata or {}).get(b"path", b"?").decode()
    return FormatError(f"hit table {path} is corrupt (a row does not match its checksum): "
                       f"{REMEDY}")


def _uints(values: pa.Array) -> np.ndarray:
    return np.frombuffer(values.buffers()[1], np.uint64)[values.offset:values.offset
                                                         + len(values)]


def _ints(values: pa.Array) -> np.ndarray:
    """An int32 Arrow array as a numpy view (``to_numpy`` would import pandas)."""
    return np.frombuffer(values.buffers()[1], np.int32)[values.offset:values.offset + len(values)]


class _StringAt:
    """``at(i)``: the UTF-8 bytes of string ``i`` of an Arrow string array, read straight
    from its buffers (a binary search touches a few of them, no Python strings made)."""

    def __init__(self, values: pa.Array) -> None:
        _, offsets, data = values.buffers()
        self.offsets = np.frombuffer(offsets, np.int32)[values.offset:]
        self.data = memoryview(data) if data is not None else memoryview(b"")

    def __call__(self, i: int) -> bytes:
        return bytes(self.data[self.offsets[i]:self.offsets[i + 1]])


def _image_paths(images: Any, shard: Any, captions: pa.Table) -> pa.Array:
    """The image path of each caption row, from the image shard of the same embed block
    (captions and their images are written together); null where not found there."""
    import pyarrow.compute as pc

    block = next((i for i, r in enumerate(images.records) if r.block == shard.block), None)
    if block is None:
        return pa.nulls(captions.num_rows, pa.string())
    t = images.read_shard(block, ["id", "image"], threads=False)
    at = pc.index_in(captions.column("image_id"), value_set=t.column("id"))
    return pc.take(t.column("image"), at).combine_chunks()
