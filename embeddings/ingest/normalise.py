"""Raw manifest rows -> one canonical Arrow layout, whatever the format.

Canonical columns: ``row`` (position in the manifest), ``error`` (set by a reader for a row
it could not parse), ``id``, ``image``, ``split``, ``label`` (cleaned strings or null),
``labels`` (list, the ``label`` first when it was not in it) and ``captions`` (the caption
entries of the row, blanks kept so they become ``empty caption`` rejects), plus
``caption_ids`` (explicit ids of COCO / Karpathy captions, else null).

Table formats (CSV, Parquet) are normalised with Arrow compute kernels, a whole chunk at a
time; row formats (JSONL, COCO, Karpathy, folders) row by row in Python, where the
per-row JSON parse dominates anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

IMAGE_KEYS = ("image", "image_path", "filepath", "file_name", "path")
CAPTION_KEYS = ("captions", "caption", "text")
LABEL_SEP = "|"
KNOWN_COLUMNS = (*IMAGE_KEYS, *CAPTION_KEYS, "id", "split", "label", "labels")

_LIST = pa.list_(pa.string())
CANON = pa.schema([("row", pa.int64()), ("error", pa.string()), ("id", pa.string()),
                   ("image", pa.string()), ("split", pa.string()), ("label", pa.string()),
                   ("labels", _LIST), ("captions", _LIST), ("caption_ids", _LIST)])


# ------------------------------------------------------------------ row formats (Python)

def _text(value: Any) -> str | None:
    """A scalar as a non-blank string, else None."""
    if value is None or isinstance(value, (list, tuple, dict)):
        return None if not value else str(value)
    text = str(value)
    return text if text.strip() else None


def _clean(value: Any) -> str | None:
    text = _text(value)
    return None if text is None else text.strip()


def _items(value: Any, sep: str | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None]
    return [str(value)] if sep is None else str(value).split(sep)


def _caption_entries(row: Mapping[str, Any]) -> tuple[list[str], list[str | None] | None]:
    if "_captions" in row:  # COCO / Karpathy: (id, text) pairs
        pairs = row["_captions"]
        return [t or "" for _, t in pairs], [None if c is None else str(c) for c, _ in pairs]
    blank = None
    for k in CAPTION_KEYS:
        v = row.get(k)
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            return _items(v, None), None
        if str(v).strip():
            return [str(v)], None
        blank = [str(v)] if blank is None else blank  # kept: reported as `empty caption`
    return blank or [], None


def canonical_row(n: int, row: Mapping[str, Any]) -> tuple[Any, ...]:
    """One raw row (a dict) as a tuple of canonical column values."""
    if "_error" in row:
        return (n, row["_error"], row.get("id"), None, None, None, [], [], None)
    image = next((t for t in (_text(row.get(k)) for k in IMAGE_KEYS) if t is not None), None)
    labels = [x for x in (s.strip() for s in _items(row.get("labels"), LABEL_SEP)) if x]
    label = _clean(row.get("label")) or (labels[0] if len(labels) == 1 else None)
    if label and label not in labels:
        labels.insert(0, label)
    captions, caption_ids = _caption_entries(row)
    return (n, None, _clean(row.get("id")), image, _clean(row.get("split")), label, labels,
            captions, caption_ids)


def from_rows(rows: Iterable[Mapping[str, Any]], first_row: int) -> pa.Table:
    values = [canonical_row(first_row + i, r) for i, r in enumerate(rows)]
    columns = list(zip(*values)) if values else [[] for _ in CANON]
    return pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, CANON)],
                                schema=CANON)


# -------------------------------------------------------------- table formats (vectorised)

def _as_string(col: pa.Array) -> pa.Array | None:
    t = col.type
    if pa.types.is_dictionary(t):
        return _as_string(col.dictionary_decode())
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t) \
            or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t):
        return pc.cast(col, pa.string())
    return None


def _as_list(col: pa.Array, sep: str | None) -> pa.Array | None:
    """A string column split by ``sep`` (or as one entry), or a list column, as list<string>;
    null rows and null items are dropped (empty lists), except null rows when split."""
    t = col.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        values = _as_string(pc.list_flatten(col))
        if values is None:
            return None
        return _rebuild(len(col), pc.list_parent_indices(col), values, values.is_valid())
    text = _as_string(col)
    if text is None:
        return None
    if sep is not None:  # null rows stay null here; `_labels` rebuilds the lists anyway
        return pc.split_pattern(text, sep)
    if not text.null_count:  # one entry a row: no copy of the text
        return pa.ListArray.from_arrays(pa.array(np.arange(len(text) + 1, dtype=np.int32)),
                                        text)
    valid = np.asarray(text.is_valid())
    offsets = np.concatenate([[0], np.cumsum(valid)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), text.filter(pa.array(valid)))


def _rebuild(n: int, parents: pa.Array, values: pa.Array, keep: Any) -> pa.ListArray:
    """Lists of ``n`` rows from flat ``values`` and their parent rows, keeping ``keep``."""
    parents = np.asarray(parents)
    if keep is not None:
        keep = np.asarray(pc.fill_null(keep, False))
        parents, values = parents[keep], values.filter(pa.array(keep))
    counts = np.bincount(parents, minlength=n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pc.cast(values, pa.string()))


def _empty_lists(n: int) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()))


def _nonblank(text: pa.Array) -> pa.Array:
    return pc.if_else(pc.not_equal(pc.utf8_trim_whitespace(text), ""), text, None)


def _cleaned(text: pa.Array) -> pa.Array:
    trimmed = pc.utf8_trim_whitespace(text)
    return pc.if_else(pc.not_equal(trimmed, ""), trimmed, None)


def _labels(label: pa.Array, labels: pa.ListArray) -> tuple[pa.Array, pa.ListArray]:
    """``label`` defaults to a single ``labels`` entry and is put first in ``labels``."""
    n = len(label)
    if not len(pc.list_flatten(labels)):  # no `labels` values: [label] or []
        valid = np.asarray(label.is_valid())
        offsets = np.concatenate([[0], np.cumsum(valid)]).astype(np.int32)
        return label, pa.ListArray.from_arrays(pa.array(offsets), label.filter(pa.array(valid)))
    flat = pc.utf8_trim_whitespace(pc.list_flatten(labels))
    labels = _rebuild(n, pc.list_parent_indices(labels), flat, pc.not_equal(flat, ""))
    lengths = np.asarray(pc.list_value_length(labels))
    single = pc.list_element(pc.if_else(pa.array(lengths == 1), labels, pa.nulls(n, _LIST)), 0) \
        if n else pa.nulls(0, pa.string())
    label = pc.coalesce(label, single)
    flat, parents = pc.list_flatten(labels), np.asarray(pc.list_parent_indices(labels))
    contains = np.zeros(n, bool)
    if len(flat):
        same = np.asarray(pc.fill_null(pc.equal(flat, label.take(pa.array(parents))), False))
        contains[parents[same]] = True
    need = np.asarray(label.is_valid()) & ~contains
    if not need.any():
        return label, labels
    new_len = lengths + need
    offsets = np.concatenate([[0], np.cumsum(new_len)])
    order = np.empty(offsets[-1], np.int64)
    at_front = offsets[:-1][need]
    order[at_front] = len(flat) + np.flatnonzero(need)
    rest = np.ones(len(order), bool)
    rest[at_front] = False
    order[rest] = np.arange(len(flat))
    values = pa.concat_arrays([flat.cast(pa.string()), label.cast(pa.string())]).take(
        pa.array(order))
    return label, pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def _captions(cols: Mapping[str, pa.Array], n: int) -> pa.Array | None:
    """The first caption column with a non-blank value per row; blank strings are kept as one
    entry when no column has text, so they are reported as ``empty caption``."""
    present = [k for k in CAPTION_KEYS if k in cols]
    if not present:
        return _empty_lists(n)
    if len(present) == 1:
        return _as_list(cols[present[0]], None)
    result, chosen = None, np.zeros(n, bool)
    fallback: list[tuple[pa.Array, np.ndarray]] = []
    for k in present:
        col = cols[k]
        entries = _as_list(col, None)
        if entries is None:
            return None
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            has = np.asarray(col.is_valid())
        else:
            text = _as_string(col)
            has = np.asarray(pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(text), ""),
                                          False))
            fallback.append((entries, np.asarray(text.is_valid())))
        take = has & ~chosen
        result = entries if result is None else pc.if_else(pa.array(take), entries, result)
        chosen |= has
    for entries, valid in fallback:
        take = valid & ~chosen
        if take.any():
            result = pc.if_else(pa.array(take), entries, result)
            chosen |= take
    return result


def from_columns(batch: pa.RecordBatch, first_row: int) -> pa.Table:
    """A CSV / Parquet batch in canonical form, with Arrow kernels (Python for odd types)."""
    n = batch.num_rows
    cols = {name: batch.column(i) for i, name in enumerate(batch.schema.names)
            if name in KNOWN_COLUMNS}

    def text(name: str) -> pa.Array:
        return _as_string(cols[name]) if name in cols else pa.nulls(n, pa.string())

    images = [_as_string(cols[k]) for k in IMAGE_KEYS if k in cols]
    simple = [text(k) for k in ("id", "split", "label")]
    labels = _as_list(cols["labels"], LABEL_SEP) if "labels" in cols else _empty_lists(n)
    captions = _captions(cols, n)
    if any(a is None for a in (*images, *simple, labels, captions)):
        return from_rows(batch.to_pylist(), first_row)  # nested or odd types
    image = pc.coalesce(*[_nonblank(a) for a in images]) if images else pa.nulls(n, pa.string())
    rid, split, label = (_cleaned(a) for a in simple)
    label, labels = _labels(label, labels)
    rows = pa.array(np.arange(first_row, first_row + n, dtype=np.int64))
    return pa.Table.from_arrays(
        [rows, pa.nulls(n, pa.string()), rid, image, split, label, labels, captions,
         pa.nulls(n, _LIST)], schema=CANON)


def error_rows(errors: Sequence[tuple[str, str]], first_row: int) -> pa.Table:
    """Canonical rows for (id, reason) pairs a reader could not parse."""
    return from_rows([{"_error": why, "id": rid} for rid, why in errors], first_row)
