"""A run from vectors made elsewhere (another tool's embeddings, synthetic data): image rows
(and one caption row per image, for text columns) written through the embed stage's own
shard writer and manifest, so every later stage (index, search, serve, heads) works on it
as on an embedded run.

    write_vectors_run("runs/x", {"ext_image": 512}, shards)   # shards: VectorShard, ...

A column named ``<encoder>_image`` holds image rows, ``<encoder>_text`` caption rows.  Give
a :class:`Provenance` instead of a dimension to tie a column to a real model (then search
embeds queries with it); a dimension alone records an "imported" model nothing can load.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from . import Run
from .embed import Column, EmbedManifest, RunIdentity, ShardRecord
from .provenance import Provenance
from .shards import ShardInfo, shard_bytes


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
    caption_vectors: dict[str, np.ndarray] = field(default_factory=dict)  # one per image


def write_vectors_run(path: str | os.PathLike, columns: dict[str, int | Provenance],
                      shards: Iterable[VectorShard], dtype: str = "float16",
                      model: str = "imported", append: bool = False) -> Run:
    """Write (or, with ``append``, extend) a run holding ``columns`` (name -> dimension or
    provenance).  The manifest is written last; both it and the run identity are sealed
    on this machine, like an embedded run's."""
    run = Run(path)
    old = run.embed.manifest() if append else None
    cols = dict(old.own_columns) if old else {
        name: _column(name, spec, dtype, model) for name, spec in columns.items()}
    records: dict[str, list[ShardRecord]] = {k: list(old.shards[k]) if old else []
                                             for k in ("images", "captions")}
    block = max((r.block for r in records["images"]), default=-1) + 1
    for shard in shards:
        n = len(shard.ids)
        caps = shard.captions or [[] for _ in range(n)]
        meta = {"id": shard.ids, "image": shard.image or shard.ids,
                "split": shard.split or [None] * n, "label": shard.label or [None] * n,
                "labels": shard.labels or [[]] * n, "captions": caps}
        info = ShardInfo(block, list(shard.ids), [])
        records["images"].append(run.embed.write_shard(
            "images", block, shard_bytes("images", meta, shard.vectors, dtype, info)))
        m = n if shard.caption_vectors else 0
        text = {"id": [f"{i}#0" for i in shard.ids[:m]], "image_id": shard.ids[:m],
                "caption": [(c or [""])[0] for c in caps[:m]], "split": meta["split"][:m],
                "label": meta["label"][:m], "labels": meta["labels"][:m]}
        records["captions"].append(run.embed.write_shard(
            "captions", block, shard_bytes("captions", text, shard.caption_vectors, dtype,
                                           ShardInfo(block, [], []))))
        block += 1
    manifest = EmbedManifest(
        old.dataset if old else {"root": str(run.path), "source": "imported"},
        old.config if old else {"dtype": dtype}, cols, records,
        {"count": 0, "by_reason": {}}, {}, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if old is None:  # the run identity, as embed writes it (verify compares the two)
        run.embed.write_identity(RunIdentity(
            {"data": {"root": manifest.dataset["root"], "format": None}, "source": "imported",
             "dtype": dtype}, cols))
    run.embed.write_manifest(manifest, [])
    return run


def _column(name: str, spec: int | Provenance, dtype: str, model: str) -> Column:
    encoder, modality = name.rsplit("_", 1)
    if modality not in ("image", "text"):
        raise ValueError(f"column {name!r}: names end in _image or _text")
    prov = spec if isinstance(spec, Provenance) else Provenance(
        type="imported", model=model, dim=int(spec),
        weights_sha256=hashlib.sha256(f"{model}/{encoder}".encode()).hexdigest())
    return Column(name, "images" if modality == "image" else "captions", encoder, modality,
                  dtype, prov)
