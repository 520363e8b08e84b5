"""Image-level features of a run for the heads: one row per image, text columns as the
mean of each image's captions (read through the store, no model runs).

Columns stream shard by shard and stay in their stored dtype (float16 halves the memory
of float32; the heads convert a chunk or batch at a time).  Caption means are summed in
float32 block by block: the captions of embed block ``k`` belong to the images of block
``k``, so only that block's sums are held, and its means leave as float16.

Memory: the features and the float32 copies the heads make of them are compared with
the heads' memory budget (``[heads] memory_budget_gb``, default the memory available).
Within it they are arrays in memory.  Beyond it every column goes through the store's
feature cache (``RUN/heads/cache``: a raw float16 file per column, reused while the
shards are the same) and the heads stream it chunk by chunk (:mod:`embeddings.streamed`).
When even streaming does not fit (the per-image metadata, chunk buffers and samples the
heads hold), one error names the budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embeddings import streamed
from embeddings.errors import InputError
from embeddings.features import CaptionMeans, check_finite_rows
from embeddings.store import Column, EmbedFiles, Run
from embeddings.store.featcache import CacheWriter, cache_key
from embeddings.streamed import StreamedColumn

HEADS_COPIES = 2  # float32 copies of the features a head holds while training (estimate)
ROW_BYTES = 400  # per image while streaming: id string, metadata, split, targets, masks
SWEEP_SHARE = 4  # the probe's in-memory sweep sample takes at most 1/4 of the budget


@dataclass
class Features:
    """Image-level features of a run: one array per column, with a row mask per column."""

    ids: list[str]
    table: pa.Table  # image metadata (id, split, label, labels)
    arrays: dict[str, Any]  # np.ndarray (stored dtype) or StreamedColumn (on disk)
    present: dict[str, np.ndarray]  # False: the image has no caption for a text column
    columns: dict[str, Column]  # with their provenance, from the embed manifest
    streamed: bool = False


def load_features(run: str | Path, columns: Sequence[str],
                  budget_gb: float | None = None) -> Features:
    """Read ``columns`` of ``run`` as image-level arrays (text: mean of the captions), or
    as streamed columns of the feature cache when they exceed the memory budget."""
    store = Run(run)
    files = store.embed
    manifest = files.manifest()
    infos = {c: manifest.column(c) for c in columns}
    table = files.read_table("images", ["id", "split", "label", "labels"])
    ids = table.column("id").to_pylist()
    if budget_gb is not None and not budget_gb > 0:
        raise InputError(f"[heads] memory_budget_gb must be above 0, not {budget_gb}")
    budget = int(budget_gb * 2**30) if budget_gb else _available()
    if not stream_needed(len(ids), infos, budget):
        arrays, present = {}, {}
        for col, info in infos.items():
            arrays[col], present[col] = _in_memory(files, col, info, ids)
        return Features(ids, table, arrays, present, infos)
    arrays, present = {}, {}
    for col, info in infos.items():
        cached = _cached(store, col, info, ids)
        arrays[col], present[col] = StreamedColumn(cached, budget), cached.present()
    return Features(ids, table, arrays, present, infos, streamed=True)


def stream_needed(n: int, infos: dict[str, Column], budget: int) -> bool:
    """False when the features and the heads' float32 copies fit ``budget`` bytes; True
    when they must stream; InputError when even streaming does not fit."""
    dims = sum(c.dim for c in infos.values())
    stored = sum(c.dim * (2 if c.dtype == "float16" else 4) for c in infos.values())
    need = n * stored + n * dims * 4 * HEADS_COPIES
    if not budget or need <= budget:
        return False
    # Streaming holds the per-image metadata, a chunk of every column (float16, selected,
    # float32), the validation sample and the probe's sweep share.
    floor = (n * ROW_BYTES + min(n, streamed.CHUNK_ROWS) * dims * 10
             + min(n, streamed.SAMPLE_ROWS) * dims * 4 * 2)
    if floor + budget // SWEEP_SHARE > budget or floor > budget:
        raise InputError(
            f"the heads need about {need / 2**30:.3g} GiB for {n} images x {dims} features "
            f"in memory and at least {floor * SWEEP_SHARE / (SWEEP_SHARE - 1) / 2**30:.3g} "
            f"GiB to stream them from disk, more than the memory budget of "
            f"{budget / 2**30:.3g} GiB ([heads] memory_budget_gb, default: the memory "
            "available): raise it (--memory-budget), use a machine with more memory, or "
            "train on fewer inputs (--inputs)")
    return True


# ------------------------------------------------------------------------------ in memory

def _in_memory(files: EmbedFiles, col: str, info: Column,
               ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    dtype = np.float16 if info.dtype == "float16" else np.float32
    if info.kind == "images":
        out = np.empty((len(ids), info.dim), dtype=dtype)
        for chunk in files.iter_column(col):
            part = check_finite_rows(chunk.vectors, f"embedding column {col!r}")
            out[chunk.start:chunk.start + len(part)] = part
        return out, np.ones(len(ids), dtype=bool)
    out = np.empty((len(ids), info.dim), dtype=dtype)
    present = np.empty(len(ids), dtype=bool)
    try:
        for lo, means, has in _block_means(files, col, info, ids):
            out[lo:lo + len(means)], present[lo:lo + len(means)] = means, has
    except _Stray:  # captions stored apart from their images (not our embed stage)
        return _whole_means(files, col, info, ids, dtype)
    return out, present


class _Stray(Exception):
    """A caption whose image is not in the caption shard's block."""


def _block_means(files: EmbedFiles, col: str, info: Column, ids: list[str]
                 ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, float16 means, has-caption mask) per image shard, in row order; sums
    for one block at a time (float32, never an (n, dim) array)."""
    images, captions = files.reader("images"), files.reader("captions")
    by_block: dict[int, list[int]] = {}
    for s, rec in enumerate(captions.records):
        by_block.setdefault(rec.block, []).append(s)
    for i, rec in enumerate(images.records):
        lo, hi = int(images.offsets.starts[i]), int(images.offsets.starts[i + 1])
        local = {image_id: r for r, image_id in enumerate(ids[lo:hi])}
        means = CaptionMeans(hi - lo, info.dim)
        for s in by_block.pop(rec.block, []):
            owners = captions.read_shard(s, ["image_id"]).column(0).to_pylist()
            rows = np.fromiter((local.get(o, -1) for o in owners), np.int64, len(owners))
            if (rows < 0).any():
                raise _Stray
            for chunk in captions.iter_column(col, info.dim, shards=[s]):
                at = chunk.start - int(captions.offsets.starts[s])
                means.add(rows[at:at + len(chunk.vectors)],
                          check_finite_rows(chunk.vectors, f"embedding column {col!r}"))
        yield (lo, *means.result(np.float16 if info.dtype == "float16" else np.float32))
    if any(by_block.values()):  # captions of a block without images
        raise _Stray


def _whole_means(files: EmbedFiles, col: str, info: Column, ids: list[str],
                 dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Caption means with one sums array for every image (captions in any block)."""
    captions = files.reader("captions")
    index = {image_id: i for i, image_id in enumerate(ids)}
    means = CaptionMeans(len(ids), info.dim)
    for s in range(len(captions.records)):
        owners = captions.read_shard(s, ["image_id"]).column(0).to_pylist()
        rows = np.fromiter((index.get(o, -1) for o in owners), np.int64, len(owners))
        for chunk in captions.iter_column(col, info.dim, shards=[s]):
            at = chunk.start - int(captions.offsets.starts[s])
            means.add(rows[at:at + len(chunk.vectors)],
                      check_finite_rows(chunk.vectors, f"embedding column {col!r}"))
    return means.result(dtype)


# ------------------------------------------------------------------------------ on disk

def _cached(store: Run, col: str, info: Column, ids: list[str]) -> Any:
    """The feature cache of ``col`` (written from the shards first when missing or stale)."""
    files = store.embed
    shards = files.manifest().shards
    digests = [r.digest for r in shards["images"]]
    if info.kind != "images":
        digests += ["captions"] + [r.digest for r in shards["captions"]]
    key = cache_key(col, info.kind, info.dim, digests)
    cache = store.heads.cache
    found = cache.open(col, key, len(ids), info.dim)
    if found is not None:
        return found

    def fill(writer: CacheWriter) -> np.ndarray:
        if info.kind == "images":
            for chunk in files.iter_column(col):
                writer.write(check_finite_rows(chunk.vectors, f"embedding column {col!r}"))
            return np.ones(len(ids), dtype=bool)
        present = np.empty(len(ids), dtype=bool)
        try:
            for lo, means, has in _block_means(files, col, info, ids):
                writer.write(means)
                present[lo:lo + len(has)] = has
        except _Stray:
            raise InputError(f"the captions of column {col!r} are not stored in the blocks "
                             "of their images, so their means need every image's sums in "
                             "memory, more than the heads' memory budget: re-embed the run "
                             "with `python -m pipeline embed` or raise --memory-budget"
                             ) from None
        return present

    return cache.write(col, key, len(ids), info.dim, fill)


def _available() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
