"""Image-level feature arrays of a run for the heads: one row per image, text columns as the
mean of each image's captions (read through the store, no model runs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from embeddings.features import caption_means, check_finite
from embeddings.store import Column, Run


@dataclass
class Features:
    """Image-level features of a run: one array per column, with a row mask per column."""

    ids: list[str]
    table: pa.Table  # image metadata (id, split, label, labels)
    arrays: dict[str, np.ndarray]
    present: dict[str, np.ndarray]  # False: the image has no caption for a text column
    columns: dict[str, Column]  # with their provenance, from the embed manifest


def load_features(run: str | Path, columns: Sequence[str]) -> Features:
    """Read ``columns`` of ``run`` as image-level arrays (text: mean of the captions)."""
    files = Run(run).embed
    manifest = files.manifest()
    table = files.read_table("images", ["id", "split", "label", "labels"])
    ids = table.column("id").to_pylist()
    arrays, present = {}, {}
    owners: list[str] | None = None  # image id of each caption row, read once
    for col in columns:
        info = manifest.column(col)
        vectors = check_finite(files.read_vectors(col), f"embedding column {col!r}")
        if info.kind == "images":
            arrays[col], present[col] = vectors, np.ones(len(ids), dtype=bool)
        else:
            if owners is None:
                owners = files.read_table("captions", ["image_id"]).column(0).to_pylist()
            arrays[col], present[col] = caption_means(ids, owners, vectors)
    return Features(ids, table, arrays, present, {c: manifest.column(c) for c in columns})
