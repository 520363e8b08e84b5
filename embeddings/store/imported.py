"""A run from vectors made elsewhere (another tool's embeddings, synthetic data): image rows
written through the embed stage's own shard writer and manifest, so every later stage
(index, search, serve, heads) works on it as on an embedded run.

    write_vectors_run("runs/x", {"ext_image": 512}, shards)   # shards: VectorShard, ...
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from . import Run
from .embed import Column, EmbedManifest, ShardInfo, ShardRecord, shard_bytes
from .provenance import Provenance


@dataclass
class VectorShard:
    """One shard of image rows: ids, one ``(n, dim)`` array per column, optional metadata."""

    ids: list[str]
    vectors: dict[str, np.ndarray]
    split: list[str | None] | None = None
    label: list[str | None] | None = None
    labels: list[list[str]] | None = None
    image: list[str] | None = None
    captions: list[list[str]] | None = field(default=None)


def write_vectors_run(path: str | os.PathLike, columns: dict[str, int],
                      shards: Iterable[VectorShard], dtype: str = "float16",
                      model: str = "imported", append: bool = False) -> Run:
    """Write (or, with ``append``, extend) a run of image rows holding ``columns``
    (name -> dimension; names end in ``_image``).  The manifest is written last."""
    run = Run(path)
    old = run.embed.manifest() if append else None
    cols = dict(old.columns) if old else {
        name: Column(name, "images", name.rsplit("_", 1)[0], "image", dtype,
                     Provenance(type="imported", model=model, dim=dim,
                                weights_sha256=hashlib.sha256(f"{model}/{name}".encode())
                                .hexdigest()))
        for name, dim in columns.items()}
    records: dict[str, list[ShardRecord]] = {k: list(old.shards[k]) if old else []
                                             for k in ("images", "captions")}
    block = max((r.block for r in records["images"]), default=-1) + 1
    for shard in shards:
        n = len(shard.ids)
        meta = {"id": shard.ids, "image": shard.image or shard.ids,
                "split": shard.split or [None] * n, "label": shard.label or [None] * n,
                "labels": shard.labels or [[]] * n, "captions": shard.captions or [[]] * n}
        info = ShardInfo(block, list(shard.ids), [])
        records["images"].append(run.embed.write_shard(
            "images", block, shard_bytes("images", meta, shard.vectors, dtype, info)))
        empty = {k: [] for k in ("id", "image_id", "caption", "split", "label", "labels")}
        records["captions"].append(run.embed.write_shard(
            "captions", block, shard_bytes("captions", empty, {}, dtype,
                                           ShardInfo(block, [], []))))
        block += 1
    manifest = EmbedManifest(
        old.dataset if old else {"root": str(run.path), "source": "imported"},
        old.config if old else {"dtype": dtype}, cols, records,
        {"count": 0, "by_reason": {}}, {}, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    run.embed.write_manifest(manifest, [])
    return run
