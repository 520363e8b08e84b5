"""Pairs of two embedding columns of a run, streamed shard by shard, split train/validation.

Two columns of one kind pair row by row (``use_text`` and ``minilm_text``: the same
caption); a caption column and an image column pair each caption with its image
(``minilm_text -> clip_image``).  Rows of the held-out splits (``exclude_splits``,
default ``test``) are never paired, so an evaluation on them stays clean.  Validation is
decided per *group* (the image a caption belongs to) by a seeded hash of its id: the
same rows on every pass and every rerun, no two captions of one image on both sides,
and no list of rows to keep in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import xxhash

from embeddings.errors import FormatError, InputError
from embeddings.store import Column, Run


@dataclass(frozen=True)
class PairPlan:
    source: Column
    target: Column
    kind: str  # the kind whose shards are walked: captions when either side is a caption
    rows: int  # rows of that kind in the run (before held-out splits are dropped)


@dataclass
class PairChunk:
    x: np.ndarray  # float32 (n, source dim)
    y: np.ndarray  # float32 (n, target dim), unit rows
    val: np.ndarray  # bool (n,)
    draw: np.ndarray  # float (n,) in [0, 1), fixed per row: draw < f is a sample of share f


def plan_pairs(run: Run, source: str, target: str) -> PairPlan:
    manifest = run.embed.manifest()
    if source == target:
        raise InputError(f"source and target are both {source!r}: an adapter maps one column "
                         "into another")
    for name in (source, target):
        if name not in manifest.columns:
            raise InputError(f"no embedding column {name!r} in {run.path}; it has "
                             f"{sorted(manifest.columns)}")
    src, tgt = manifest.column(source), manifest.column(target)
    kind = "captions" if "captions" in (src.kind, tgt.kind) else "images"
    return PairPlan(src, tgt, kind, manifest.rows(kind))


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def hashed_uniform(ids: list[str], seed: int, salt: str) -> np.ndarray:
    """A number in [0, 1) per id, fixed by (seed, salt, id)."""
    prefix = f"{seed}:{salt}:"
    return np.fromiter((xxhash.xxh64_intdigest((prefix + i).encode()) for i in ids), np.uint64,
                       count=len(ids)) / np.float64(2 ** 64)


def _vectors(table: pa.Table, column: Column) -> np.ndarray:
    arr = table.column(column.name).combine_chunks()
    out = np.asarray(arr.values.to_numpy(zero_copy_only=False), np.float32)
    out = out.reshape(len(arr), column.dim)
    if not np.isfinite(out).all():
        raise FormatError(f"embedding column {column.name!r} holds NaN or inf values: "
                          "re-embed the run")
    return out


def iter_pairs(run: Run, plan: PairPlan, val_fraction: float, exclude_splits: tuple[str, ...],
               seed: int, verify: bool = True) -> Iterator[PairChunk]:
    """One chunk of pairs per shard of ``plan.kind``, in shard order."""
    src, tgt = plan.source, plan.target
    cross = src.kind != tgt.kind
    image_side: Column | None = (src if src.kind == "images" else tgt) if cross else None
    image_vectors, image_row = None, {}
    if image_side is not None:  # the image column is the smaller one: hold it, float16
        image_vectors = run.embed.read_vectors(image_side.name, np.float16, verify)
        ids = run.embed.read_table("images", ["id"], verify).column(0).to_pylist()
        image_row = {i: r for r, i in enumerate(ids)}
    group = "image_id" if plan.kind == "captions" else "id"
    own = [c.name for c in (src, tgt) if c.kind == plan.kind]
    meta = ["split", "id"] + (["image_id"] if group == "image_id" else [])
    for table in run.embed.iter_batches(plan.kind, [*own, *meta], verify):
        groups = table.column(group).to_pylist()
        splits = table.column("split").to_pylist()
        use = np.array([s not in exclude_splits for s in splits], bool)
        if image_side is not None:
            rows = np.array([image_row.get(g, -1) for g in groups], np.int64)
            use &= rows >= 0  # a caption of an image the run does not hold: no pair
        if not use.any():
            continue
        sides = {}
        for col in (src, tgt):
            if col.kind == plan.kind:
                sides[col.name] = _vectors(table, col)[use]
            else:
                sides[col.name] = np.asarray(image_vectors[rows[use]], np.float32)
        kept_groups = [g for g, u in zip(groups, use) if u]
        val = hashed_uniform(kept_groups, seed, "val") < val_fraction
        ids = [i for i, u in zip(table.column("id").to_pylist(), use) if u]
        draw = hashed_uniform(ids, seed, "sample")
        yield PairChunk(sides[src.name], unit_rows(sides[tgt.name]), val, draw)
