"""On-disk format of the embed stage: Parquet shards plus a JSON stage manifest.

Layout of a run directory ``RUN`` (schema version 1)::

    RUN/embed/manifest.json              written last, atomically
    RUN/embed/rejects.jsonl              one JSON object per skipped item
    RUN/embed/images/part-00000.parquet  one row per image
    RUN/embed/captions/part-00000.parquet one row per caption

Every shard covers a fixed block of input records; rows that could not be embedded are
left out and listed (id, reason) in the shard's key-value metadata, so a shard is
self-contained and appears through one atomic rename.  Embedding columns are
``fixed_size_list<float16|float32>[dim]`` named ``<encoder>_<modality>``
(``clip_image``, ``clip_text``, ``minilm_text``).  This module is the only code that
knows the format: other stages call :func:`read_manifest`, :func:`read_vectors` and
:func:`read_table`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import FormatError

SCHEMA_VERSION = 1
STAGE_DIR = "embed"
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
KINDS = ("images", "captions")
META_KEY = b"embeddings.shard"

# Metadata columns of each record kind, in order (embedding columns follow them).
IMAGE_FIELDS = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.string()),
        ("split", pa.string()),
        ("label", pa.string()),
        ("labels", pa.list_(pa.string())),
        ("captions", pa.list_(pa.string())),
    ]
)
CAPTION_FIELDS = pa.schema(
    [
        ("id", pa.string()),
        ("image_id", pa.string()),
        ("caption", pa.string()),
        ("split", pa.string()),
        ("label", pa.string()),
        ("labels", pa.list_(pa.string())),
    ]
)
FIELDS = {"images": IMAGE_FIELDS, "captions": CAPTION_FIELDS}
DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}


def stage_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / STAGE_DIR


def shard_name(kind: str, index: int) -> str:
    return f"{kind}/part-{index:05d}.parquet"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def vectors_to_arrow(vectors: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    """A 2-D array as a fixed-size-list column, without going through Python lists."""
    np_type, pa_type = DTYPES[dtype]
    flat = np.ascontiguousarray(vectors, dtype=np_type).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa_type), vectors.shape[1])


def write_shard(
    path: Path,
    kind: str,
    rows: Mapping[str, Sequence[Any]],
    vectors: Mapping[str, np.ndarray],
    dtype: str,
    info: Mapping[str, Any],
) -> None:
    """Write one shard atomically: metadata columns ``rows``, embedding ``vectors``.

    ``info`` (input ids covered, rejects) goes into the file's key-value metadata.
    """
    arrays = [pa.array(rows[f.name], type=f.type) for f in FIELDS[kind]]
    names = [f.name for f in FIELDS[kind]]
    for name, vec in vectors.items():
        if len(vec) != len(arrays[0]):
            raise ValueError(f"column {name}: {len(vec)} vectors for {len(arrays[0])} rows")
        arrays.append(vectors_to_arrow(vec, dtype))
        names.append(name)
    table = pa.Table.from_arrays(arrays, names=names)
    table = table.replace_schema_metadata({META_KEY: json.dumps(info).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def shard_info(path: Path) -> dict[str, Any]:
    """The key-value metadata of a finished shard (inputs covered, rejects)."""
    meta = pq.read_schema(path).metadata or {}
    if META_KEY not in meta:
        raise FormatError(f"{path} is not a shard written by this tool")
    return json.loads(meta[META_KEY])


def read_manifest(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The embed stage manifest of ``run_dir``; clear errors when absent or unfinished."""
    path = stage_dir(run_dir) / MANIFEST
    if not path.exists():
        raise FormatError(
            f"no embeddings in {run_dir}: {path} is missing (run `python -m pipeline embed` first)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise FormatError(
            f"{path} has schema version {manifest.get('schema_version')}, "
            f"this version reads {SCHEMA_VERSION}"
        )
    if not manifest.get("complete"):
        raise FormatError(f"the embed stage in {run_dir} did not finish: rerun it to resume")
    return manifest


def column_info(manifest: Mapping[str, Any], column: str) -> dict[str, Any]:
    """Provenance of one embedding column (kind, model, dim, dtype, ...)."""
    columns = manifest["columns"]
    if column not in columns:
        raise FormatError(f"no embedding column {column!r}; this run has {sorted(columns)}")
    return columns[column]


def shard_paths(run_dir: str | os.PathLike, manifest: Mapping[str, Any], kind: str) -> list[Path]:
    base = stage_dir(run_dir)
    return [base / s["file"] for s in manifest["shards"][kind]]


def read_vectors(
    run_dir: str | os.PathLike, column: str, dtype: type = np.float32
) -> np.ndarray:
    """All vectors of one embedding column as one contiguous ``(n, dim)`` array.

    Rows are in shard order, the same order as :func:`read_table` of that kind.
    """
    manifest = read_manifest(run_dir)
    info = column_info(manifest, column)
    dim = int(info["dim"])
    paths = shard_paths(run_dir, manifest, info["kind"])
    total = sum(s["rows"] for s in manifest["shards"][info["kind"]])
    out = np.empty((total, dim), dtype=dtype)
    pos = 0
    for path in paths:
        col = pq.read_table(path, columns=[column]).column(0).combine_chunks()
        # The child values buffer is already flat; reshape without a Python-level copy.
        flat = col.values.to_numpy(zero_copy_only=False)
        n = len(col)
        out[pos : pos + n] = flat.reshape(n, dim)
        pos += n
    if pos != total:
        raise FormatError(f"{column}: manifest says {total} rows, shards hold {pos}")
    return out


def read_table(
    run_dir: str | os.PathLike, kind: str, columns: Iterable[str] | None = None
) -> pa.Table:
    """Metadata columns (default: all non-embedding ones) of every ``kind`` row."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    manifest = read_manifest(run_dir)
    names = list(columns) if columns is not None else FIELDS[kind].names
    tables = [pq.read_table(p, columns=names) for p in shard_paths(run_dir, manifest, kind)]
    if not tables:
        return pa.Table.from_batches([], schema=FIELDS[kind]).select(names)
    return pa.concat_tables(tables)
