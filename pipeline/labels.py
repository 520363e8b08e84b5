"""Labels from a side file: a new task on a run's cached features, with no re-embedding.

``heads --labels FILE`` reads CSV, JSONL or Parquet with an ``id`` column (the run's
image ids) and one or more label columns, and joins it by id onto the run's image rows:
a label column of the file replaces the run's column of that name (``label``,
``labels``) or adds a new one.  Multi-label columns are lists (JSONL arrays, Parquet
lists) or, in the configured ``multilabel`` column, ``a|b`` strings.  Nothing of the run
is written: the file is read, digested (SHA-256, recorded in the saved heads and in
``predict``'s output) and joined in memory.

Counted and reported: ids of the file that are not in the run, duplicate ids with the
same labels (kept once) and duplicate ids whose labels disagree (left without a label:
which one is right cannot be known); run rows without a label are left out of the
heads, as for any missing label.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from embeddings.errors import InputError, MissingError

FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json",
           ".ndjson": "json", ".parquet": "parquet", ".pq": "parquet"}
RESERVED = ("split",)  # the run's splits are not relabelled


@dataclass(frozen=True)
class LabelFile:
    """A label side file, read and de-duplicated: one row per id."""

    path: Path
    sha256: str
    table: pa.Table  # "id" (string) + label columns
    rows: int  # rows in the file
    duplicates: int  # extra rows of an id that repeat its labels (kept once)
    conflicts: int  # ids whose rows disagree (left without a label)

    def record(self) -> dict[str, Any]:
        """What a saved head and ``predict`` record about the labels."""
        return {"path": str(self.path), "sha256": self.sha256, "rows": self.rows,
                "columns": [c for c in self.table.column_names if c != "id"]}


def read_label_file(path: str | Path, multilabel: Iterable[str] = ()) -> LabelFile:
    """Read, check and de-duplicate a label file (``a|b`` strings split into lists in the
    ``multilabel`` columns)."""
    path = Path(path)
    if not path.is_file():
        raise MissingError(f"labels file not found: {path}")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"labels file {path}: unknown format {path.suffix!r}; use "
                         f".csv, .jsonl or .parquet")
    data = path.read_bytes()
    table = _parse(data, fmt, path)
    if "id" not in table.column_names:
        raise InputError(f"labels file {path} needs an 'id' column (the run's image ids); "
                         f"it has {table.column_names}")
    bad = [c for c in table.column_names if c in RESERVED]
    if bad:
        raise InputError(f"labels file {path}: column(s) {bad} cannot be relabelled (the "
                         f"run's splits are kept); remove them")
    if table.num_columns < 2:
        raise InputError(f"labels file {path} has no label column besides 'id'")
    if len(set(table.column_names)) != table.num_columns:
        raise InputError(f"labels file {path} repeats a column name: {table.column_names}")
    table = table.set_column(table.column_names.index("id"), "id",
                             pc.cast(table.column("id"), pa.string()))
    if table.column("id").null_count:
        raise InputError(f"labels file {path}: {table.column('id').null_count} row(s) have "
                         f"no id")
    for name in set(multilabel) & set(table.column_names):
        table = _split_pipes(table, name)
    deduped, duplicates, conflicts = _dedupe(table)
    return LabelFile(path, hashlib.sha256(data).hexdigest(), deduped, table.num_rows,
                     duplicates, conflicts)


def join_labels(images: pa.Table, labels: LabelFile) -> tuple[pa.Table, list[str]]:
    """The run's image rows with the file's label columns (null where the file has no
    row for an image), and the notes to report."""
    ids = labels.table.column("id")
    at = pc.index_in(images.column("id"), value_set=ids)
    matched = images.num_rows - at.null_count
    if not matched:
        raise InputError(f"labels file {labels.path}: none of its {ids.length()} id(s) is an "
                         f"image id of the run (file: {ids[0].as_py()!r}, run: "
                         f"{images.column('id')[0].as_py() if images.num_rows else None!r})")
    out = images
    for name in labels.table.column_names:
        if name == "id":
            continue
        column = labels.table.column(name).take(at)
        if name in out.column_names:
            out = out.set_column(out.column_names.index(name), name, column)
        else:
            out = out.append_column(name, column)
    found = pc.is_in(ids, value_set=images.column("id"))
    unknown = [v for v, ok in zip(ids.to_pylist(), found.to_pylist(), strict=True) if not ok]
    notes = [f"labels file {labels.path.name} (sha256 {labels.sha256[:12]}): {labels.rows} "
             f"row(s), {matched} of the run's {images.num_rows} image(s) matched"]
    if unknown:
        notes.append(f"labels file: {len(unknown)} id(s) not in the run, ignored: "
                     f"{unknown[:3]}{' ...' if len(unknown) > 3 else ''}")
    if labels.duplicates:
        notes.append(f"labels file: {labels.duplicates} duplicate row(s) repeating an id's "
                     f"labels, kept once")
    if labels.conflicts:
        notes.append(f"labels file: {labels.conflicts} id(s) with duplicate rows that disagree, "
                     f"left without a label")
    return out, notes


def _parse(data: bytes, fmt: str, path: Path) -> pa.Table:
    import io

    try:
        if fmt == "csv":
            from pyarrow import csv

            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            return csv.read_csv(io.BytesIO(data), parse_options=csv.ParseOptions(
                delimiter=delimiter), convert_options=csv.ConvertOptions(
                column_types={"id": pa.string()}))
        if fmt == "json":
            from pyarrow import json

            return json.read_json(io.BytesIO(data))
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"labels file {path} cannot be read as {fmt}: {first}") from None


def _split_pipes(table: pa.Table, name: str) -> pa.Table:
    """``a|b`` strings -> ``["a", "b"]`` (lists stay lists, as strings)."""
    col = table.column(name)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        values = [None if v is None else [str(x) for x in v if x not in (None, "")]
                  for v in col.to_pylist()]
    elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        values = [None if v is None else [t.strip() for t in v.split("|") if t.strip()]
                  for v in col.to_pylist()]
    else:
        raise InputError(f"multi-label column {name!r} must hold lists or 'a|b' strings, "
                         f"not {col.type}")
    return table.set_column(table.column_names.index(name), name,
                            pa.array(values, pa.list_(pa.string())))


def _dedupe(table: pa.Table) -> tuple[pa.Table, int, int]:
    """One row per id: repeats with equal labels kept once, disagreeing ones blanked."""
    ids = table.column("id").to_pylist()
    counts = Counter(ids)
    if len(counts) == len(ids):
        return table, 0, 0
    rows = table.drop_columns(["id"]).to_pylist()
    first: dict[str, int] = {}
    keep, conflict = [], set()
    for i, (key, row) in enumerate(zip(ids, rows, strict=True)):
        if key not in first:
            first[key] = i
            keep.append(i)
        elif row != rows[first[key]]:
            conflict.add(key)
    out = table.take(pa.array(keep))
    if conflict:
        blank = pa.array([k in conflict for k in out.column("id").to_pylist()])
        for name in out.column_names:
            if name != "id":
                col = out.column(name)
                out = out.set_column(out.column_names.index(name), name,
                                     pc.if_else(blank, pa.scalar(None, col.type), col))
    same = sum(c - 1 for k, c in counts.items() if c > 1 and k not in conflict)
    return out, same, len(conflict)
