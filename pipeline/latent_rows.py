"""The latent stage's rows: its input columns aligned shard by shard, read through the store.

With an image column among the inputs the latent has one row per image (the image
shards); a caption column then gives each image the re-normalised mean of its captions'
vectors, from the caption shard of the same embed block (an image without a caption has
that input absent).  With caption columns only it has one row per caption.  Nothing is
held beyond one shard's rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from embeddings.errors import InputError
from embeddings.features import CaptionMeans, check_finite_rows
from embeddings.store import Column, EmbedManifest, Run
from embeddings.store.columns import ColumnReader


@dataclass(frozen=True)
class Plan:
    columns: list[Column]
    kind: str  # images | captions: the rows of the latent column


@dataclass(frozen=True)
class ShardRows:
    shard: int  # position in the manifest's list of ``kind`` shards
    xs: list[np.ndarray]  # one (rows, dim) array per input, stored dtype
    present: list[np.ndarray]  # bool per row and input


def plan_inputs(manifest: EmbedManifest, names: Sequence[str]) -> Plan:
    """The input columns (the embed stage's own, each once) and the latent's rows."""
    if not names:
        raise InputError("[latent] inputs is empty: name the embedding columns to learn from")
    if len(set(names)) != len(names):
        raise InputError(f"[latent] inputs names a column twice: {list(names)}")
    own = manifest.own_columns
    for n in names:
        if n not in own:
            what = "a derived column: learn from the embed stage's columns" \
                if n in manifest.columns else f"not a column of this run; it has {sorted(own)}"
            raise InputError(f"[latent] input {n!r} is {what}")
    cols = [own[n] for n in names]
    kind = "images" if any(c.kind == "images" for c in cols) else "captions"
    return Plan(cols, kind)


def shard_rows(run: Run, plan: Plan, verify: bool = True,
               shards: Sequence[int] | None = None) -> Iterator[ShardRows]:
    """Each ``plan.kind`` shard's rows of every input (``shards``: only those)."""
    own = run.embed.reader(plan.kind, verify)
    captions = run.embed.reader("captions", verify) if plan.kind == "images" and any(
        c.kind == "captions" for c in plan.columns) else None
    by_block = {r.block: i for i, r in enumerate(captions.records)} if captions else {}
    for s in range(len(own.records)) if shards is None else shards:
        n = int(own.records[s].rows)
        xs, present = [], []
        ids: list[str] | None = None
        for col in plan.columns:
            if col.kind == plan.kind:
                xs.append(_whole(own, col, s, n))
                present.append(np.ones(n, bool))
                continue
            if ids is None:
                ids = own.read_shard(s, ["id"]).column(0).to_pylist()
            x, has = _caption_means(captions, by_block.get(own.records[s].block), col, ids)
            xs.append(x)
            present.append(has)
        yield ShardRows(s, xs, present)


def _whole(reader: ColumnReader, col: Column, shard: int, n: int) -> np.ndarray:
    parts = [check_finite_rows(c.vectors, f"embedding column {col.name!r}")
             for c in reader.iter_column(col.name, col.dim, shards=[shard])]
    return np.concatenate(parts) if parts else np.zeros((n, col.dim), np.float16)


def _caption_means(captions: ColumnReader | None, shard: int | None, col: Column,
                   ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per image of ``ids``, the mean of its captions in caption shard ``shard``."""
    dtype = np.float16 if col.dtype == "float16" else np.float32
    means = CaptionMeans(len(ids), col.dim)
    if captions is not None and shard is not None:
        local = {image_id: i for i, image_id in enumerate(ids)}
        owners = captions.read_shard(shard, ["image_id"]).column(0).to_pylist()
        rows = np.fromiter((local.get(o, -1) for o in owners), np.int64, len(owners))
        for chunk in captions.iter_column(col.name, col.dim, shards=[shard]):
            at = chunk.start - int(captions.offsets.starts[shard])
            means.add(rows[at:at + len(chunk.vectors)],
                      check_finite_rows(chunk.vectors, f"embedding column {col.name!r}"))
    return means.result(dtype)
