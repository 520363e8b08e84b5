"""Image-level feature arrays of a run for the heads: one row per image, text columns as the
mean of each image's captions (read through the store, no model runs).

Columns stream shard by shard and stay in their stored dtype (float16 halves the memory
of float32; the heads convert a batch at a time).  Caption means are summed in float32
block by block: the captions of embed block ``k`` belong to the images of block ``k``,
so only that block's images are looked up.  Before reading, the memory the features and
the heads' float32 copies need is compared with the memory available: too much is one
error naming both, not a crash mid-way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from embeddings.errors import InputError
from embeddings.features import CaptionMeans, check_finite_rows
from embeddings.store import Column, EmbedFiles, Run

HEADS_COPIES = 2  # float32 copies of the features a head holds while training (estimate)


@dataclass
class Features:
    """Image-level features of a run: one array per column, with a row mask per column."""

    ids: list[str]
    table: pa.Table  # image metadata (id, split, label, labels)
    arrays: dict[str, np.ndarray]  # stored dtype (float16 or float32)
    present: dict[str, np.ndarray]  # False: the image has no caption for a text column
    columns: dict[str, Column]  # with their provenance, from the embed manifest


def load_features(run: str | Path, columns: Sequence[str]) -> Features:
    """Read ``columns`` of ``run`` as image-level arrays (text: mean of the captions)."""
    files = Run(run).embed
    manifest = files.manifest()
    infos = {c: manifest.column(c) for c in columns}
    table = files.read_table("images", ["id", "split", "label", "labels"])
    ids = table.column("id").to_pylist()
    check_memory(len(ids), infos)
    arrays, present = {}, {}
    for col, info in infos.items():
        dtype = np.float16 if info.dtype == "float16" else np.float32
        if info.kind == "images":
            out = np.empty((len(ids), info.dim), dtype=dtype)
            for chunk in files.iter_column(col):
                part = check_finite_rows(chunk.vectors, f"embedding column {col!r}")
                out[chunk.start:chunk.start + len(part)] = part
            arrays[col], present[col] = out, np.ones(len(ids), dtype=bool)
        else:
            arrays[col], present[col] = _caption_means(files, col, info, ids, dtype)
    return Features(ids, table, arrays, present, infos)


def _caption_means(files: EmbedFiles, col: str, info: Column, ids: list[str],
                   dtype: type) -> tuple[np.ndarray, np.ndarray]:
    images, captions = files.reader("images"), files.reader("captions")
    block_rows = {r.block: (int(images.offsets.starts[i]), int(images.offsets.starts[i + 1]))
                  for i, r in enumerate(images.records)}
    means = CaptionMeans(len(ids), info.dim)
    everywhere: dict[str, int] | None = None
    for s, rec in enumerate(captions.records):
        owners = captions.read_shard(s, ["image_id"]).column(0).to_pylist()
        lo, hi = block_rows.get(rec.block, (0, 0))
        local = {image_id: lo + i for i, image_id in enumerate(ids[lo:hi])}
        rows = np.fromiter((local.get(o, -1) for o in owners), np.int64, len(owners))
        if (rows < 0).any():  # an image outside the block (not from our embed stage)
            if everywhere is None:
                everywhere = {image_id: i for i, image_id in enumerate(ids)}
            rows = np.fromiter((everywhere.get(o, -1) for o in owners), np.int64, len(owners))
        for chunk in captions.iter_column(col, info.dim, shards=[s]):
            at = chunk.start - int(captions.offsets.starts[s])
            means.add(rows[at:at + len(chunk.vectors)],
                      check_finite_rows(chunk.vectors, f"embedding column {col!r}"))
    return means.result(dtype)


def check_memory(n: int, infos: dict[str, Column]) -> None:
    """InputError when ``n`` rows of these columns, plus the float32 copies the heads make
    while training, need more memory than this machine has available."""
    dims = sum(c.dim for c in infos.values())
    stored = sum(c.dim * (2 if c.dtype == "float16" else 4) for c in infos.values())
    need = n * stored + n * dims * 4 * HEADS_COPIES
    available = _available()
    if available and need > available:
        raise InputError(
            f"the heads need about {need / 2**30:.1f} GiB for {n} images x {dims} features "
            f"({n * stored / 2**30:.1f} GiB of stored features, the rest for the heads' "
            f"float32 copies), more than the {available / 2**30:.1f} GiB of memory available "
            "(the budget on this machine): train on fewer inputs (--inputs) or a machine "
            "with more memory")


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
