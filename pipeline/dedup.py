"""Dedup stage: duplicate and near-duplicate groups of a run's images, from what it holds.

Signals (``[dedup] by``), all unioned into one set of groups (:mod:`embeddings.dedup`):

- ``digest``: equal content digests (the same file, byte for byte), recorded at embed time;
- ``phash``: perceptual hashes within ``hash_distance`` bits (re-encodes, resizes);
- ``vector``: an image column at cosine >= ``threshold``.  Neighbours come from the run's
  index (the k-NN graph of every row: each row's ``k`` nearest, one chunk at a time), or
  exactly within each row's nearest IVF lists of that index (``clusters``: SemDeDup's
  way, the default on an IVF index), or by exact search while the column fits half the
  memory budget (``exact``: small runs without an index).

Runs embedded before fingerprints were recorded have none: the stage says how many rows
lack them and groups those by the embedding column alone.  Everything is written through
the store (``RUN/dedup``): the group report, the keep-list, the contact sheet, the summary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from embeddings import index as ix
from embeddings.dedup import (
    RULES,
    UnionFind,
    contact_sheet,
    exact_groups,
    exact_neighbours,
    group_report,
    hash_groups,
    hash_similarity_of,
    keep_mask,
    knn_edges,
    representatives,
    summary,
    to_png,
    vector_similarity,
)
from embeddings.dedup.neighbours import cluster_groups
from embeddings.errors import InputError, UserError
from embeddings.images import ImageError, decode_image
from embeddings.index.choice import chunk_rows
from embeddings.sources import source_from_dict
from embeddings.store import Column, EmbedManifest, Fingerprints, Run, read_prints
from embeddings.store.columns import ColumnReader

from .config import DedupConfig
from .index import open_index

log = logging.getLogger(__name__)
SIGNALS = ("digest", "phash", "vector")
DEFAULT_BUDGET = 4 * 2**30


@dataclass
class DedupResult:
    run_dir: Path
    summary: dict[str, Any]
    seconds: float


def check_config(cfg: DedupConfig) -> None:
    bad = sorted(set(cfg.by) - set(SIGNALS))
    if bad or not cfg.by:
        raise InputError(f"[dedup] by: unknown signal(s) {bad}; choose from {list(SIGNALS)}")
    rules = sorted(set(cfg.keep) - set(RULES))
    if rules:
        raise InputError(f"[dedup] keep: unknown rule(s) {rules}; known: {list(RULES)}")
    if not -1 <= cfg.threshold <= 1:
        raise InputError(f"[dedup] threshold is a cosine in [-1, 1], not {cfg.threshold}")
    if not 0 <= cfg.hash_distance < 32:
        raise InputError(f"[dedup] hash_distance must be in 0..31 bits, not {cfg.hash_distance}")
    if cfg.k < 2 or cfg.lists < 1 or cfg.nprobe < 1 or cfg.sheet_groups < 0:
        raise InputError("[dedup] k must be >= 2, lists and nprobe >= 1, sheet_groups >= 0")
    if cfg.memory_budget_gb is not None and cfg.memory_budget_gb <= 0:
        raise InputError("[dedup] memory_budget_gb must be > 0")


def run_dedup(cfg: DedupConfig) -> DedupResult:
    """Group the image rows of ``cfg.run``; write the report, keep-list, sheet, summary."""
    t0 = time.perf_counter()
    check_config(cfg)
    run = Run(cfg.run)
    manifest = run.embed.manifest()
    reader = run.embed.reader("images", cfg.verify)
    n = reader.offsets.total
    if n == 0:
        raise InputError(f"{run.path} has no image rows to deduplicate")
    col = _column(cfg, manifest) if "vector" in cfg.by else None
    signals: dict[str, str] = {}
    notes: list[str] = []
    with run.lock("dedup"):
        uf = UnionFind(n)
        prints = None
        if {"digest", "phash"} & set(cfg.by) or "resolution" in cfg.keep:
            with _bar(cfg, n, "dedup fingerprints") as bar:
                prints = read_prints(reader, bar.update)
            _print_groups(cfg, prints, uf, signals, notes, run, col)
        similarity = None
        if col is not None:
            method = _vector_groups(cfg, run, col, uf)
            signals["vector"] = f"{col.name} cosine >= {cfg.threshold} ({method})"
            similarity = vector_similarity(
                lambda rows: reader.read_vectors(col.name, col.dim, rows))
        elif prints is not None and "phash" in signals:
            similarity = hash_similarity_of(prints.phash)
        else:  # equal digests only: the same bytes
            similarity = lambda rows, reps: np.ones(len(rows), np.float32)  # noqa: E731
        labels = uf.labels()
        split = _splits(reader)
        if "resolution" in cfg.keep and prints is not None and prints.missing:
            notes.append("keep rule 'resolution': rows without fingerprints count as 0 pixels")
        rep = representatives(labels, cfg.keep, split=split, prefer=cfg.prefer,
                              pixels=prints.pixels if prints is not None else None)
        report = group_report(labels, rep, similarity, split=split)
        report = replace(report, ids=reader.read_rows(report.row, ["id"]).column(0)
                         .to_numpy(zero_copy_only=False))
        if not manifest.trusted and report.groups:
            notes.append(f"the contact sheet has no pictures: {run.path} was not sealed on "
                         "this machine, so where it says its images are is not trusted")
        sheet = contact_sheet(report, _thumbnails(manifest, reader), groups=cfg.sheet_groups)
        counts = summary(labels, split)
        info = {**counts, "signals": signals, "notes": notes,
                "config": {k: v for k, v in asdict(cfg).items() if k != "run"},
                "shards": [r.file for r in reader.records],
                "seconds": round(time.perf_counter() - t0, 3),
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        info = run.dedup.write(report.to_arrow(), _keep_table(reader, keep_mask(rep)),
                               to_png(sheet), info)
    for note in notes:
        log.warning("%s", note)
    return DedupResult(run.path, info, time.perf_counter() - t0)


def _column(cfg: DedupConfig, manifest: EmbedManifest) -> Column:
    images = [c for c in manifest.columns.values() if c.kind == "images"]
    if cfg.column is None:
        if not images:
            raise InputError("the run has no image embedding column: use --by digest,phash")
        return images[0]
    col = manifest.column(cfg.column)
    if col.kind != "images":
        raise InputError(f"column {cfg.column} holds caption vectors; dedup compares images: "
                         f"use one of {[c.name for c in images]}")
    return col


def _bar(cfg: DedupConfig, total: int, desc: str) -> tqdm:
    return tqdm(total=total, unit="img", desc=desc, disable=not cfg.progress, leave=False)


def _print_groups(cfg: DedupConfig, prints: Fingerprints, uf: UnionFind,
                  signals: dict[str, str], notes: list[str], run: Run,
                  col: Column | None) -> None:
    """Union the digest and pHash groups of the rows that have fingerprints."""
    wanted = [s for s in ("digest", "phash") if s in cfg.by]
    if prints.missing:
        n = len(prints.known)
        fallback = f"grouped by {col.name} only" if col is not None else "left ungrouped"
        notes.append(f"{prints.missing} of {n} image rows have no fingerprints (embedded "
                     f"before they were recorded): {fallback}; re-embed into a new run to "
                     f"record them")
        if prints.missing == n and col is None and wanted:
            raise InputError(f"{run.path} has no fingerprints (embedded before they were "
                             "recorded): use --by vector, or re-embed into a new run")
    rows = np.flatnonzero(prints.known)
    if not len(rows):
        return
    if "digest" in wanted:
        _merge(uf, rows, exact_groups(prints.digests[rows]))
        signals["digest"] = "equal content digest (xxh3_128)"
    if "phash" in wanted:
        _merge(uf, rows, hash_groups(prints.phash[rows], cfg.hash_distance))
        signals["phash"] = f"perceptual hash within {cfg.hash_distance} bits"


def _merge(uf: UnionFind, rows: np.ndarray, sub: UnionFind) -> None:
    """Union into ``uf`` the groups ``sub`` found among ``rows`` (its 0..m-1)."""
    labels = sub.labels()
    moved = np.flatnonzero(labels != np.arange(len(labels)))
    uf.union(rows[moved], rows[labels[moved]])


def _budget(cfg: DedupConfig, entry: Any) -> int:
    if cfg.memory_budget_gb is not None:
        return int(cfg.memory_budget_gb * 2**30)
    if entry is not None:
        return int(entry.stats.get("memory_budget_bytes", DEFAULT_BUDGET))
    return DEFAULT_BUDGET


def _vector_groups(cfg: DedupConfig, run: Run, col: Column, uf: UnionFind) -> str:
    """Union the near-duplicate pairs of ``col``; returns how neighbours were found."""
    n, d = uf.parent.shape[0], col.dim
    entry = run.index.entries().get(col.name)
    method = cfg.method if cfg.method != "auto" else _auto(entry)
    budget = _budget(cfg, entry)
    chunk = chunk_rows(d, budget)
    source = run.embed.source(col.name, cfg.verify)
    with _bar(cfg, n, f"dedup {col.name}") as bar:
        if method == "exact":
            if n * d * 4 > budget // 2:
                raise InputError(
                    f"{n} vectors of {col.name} take {n * d * 4 / 2**30:.2f} GiB, more than "
                    f"half the memory budget ({budget / 2**30:.2f} GiB): build the index "
                    "first (`python -m pipeline index`) so dedup reads neighbours from it")
            x = run.embed.read_vectors(col.name, verify=cfg.verify)
            for a, b, _ in (knn_edges(batch, cfg.threshold) for batch in
                            _counted(exact_neighbours(x, cfg.k), bar)):
                uf.union(a, b)
            return f"exact search, k={cfg.k}"
        index, entry = open_index(run.path, col.name, verify=cfg.verify)
        if method == "index":
            if ix.ivf_of(index) is not None:
                ix.set_search_params(index, {"nprobe": cfg.nprobe})
            for start, scores, nbrs in ix.neighbours(index, source.chunks(
                    chunk_rows=chunk), cfg.k):
                ids = np.arange(start, start + len(nbrs))
                a, b, _ = knn_edges((ids, nbrs, scores), cfg.threshold)
                uf.union(a, b)
                bar.update(len(ids))
            probe = f", nprobe={cfg.nprobe}" if ix.ivf_of(index) is not None else ""
            return f"index {entry.factory}, k={cfg.k}{probe}"
        if ix.ivf_of(index) is None:
            raise InputError(f"--method clusters needs an IVF index; the {col.name} index is "
                             f"{entry.factory}: use --method index")
        assign = np.concatenate([a for _, a in ix.assignments(
            index, source.chunks(chunk_rows=chunk), cfg.lists)]).reshape(n, -1)
        del index
        with run.dedup.scratch() as scratch:
            spilled = np.lib.format.open_memmap(scratch / "vectors.npy", mode="w+",
                                                dtype=np.float16, shape=(n, d))
            for start, x in source.chunks(chunk_rows=chunk):
                spilled[start:start + len(x)] = x
            spilled.flush()
            cluster_groups(assign, spilled, cfg.threshold, uf, n, progress=lambda m: bar.update(
                m / assign.shape[1]))
            del spilled
        return f"exactly within the {cfg.lists} nearest lists of {entry.factory}"


def _auto(entry: Any) -> str:
    """Per IVF list on an IVF index (at 1M rows 2.5-3.6x faster than its k-NN graph,
    recall of planted copies 0.997 against 0.9998: README), the k-NN graph through any
    other index (Flat, HNSW: smaller runs), exact search without one."""
    if entry is None:
        return "exact"
    return "clusters" if entry.factory.startswith("IVF") else "index"


def _counted(batches: Iterator[Any], bar: tqdm) -> Iterator[Any]:
    for batch in batches:
        bar.update(len(batch[0]))
        yield batch


def _splits(reader: ColumnReader) -> np.ndarray:
    """Each image row's split as an object array of shared strings ('' when none)."""
    parts = [reader.read_shard(s, ["split"]).column(0) for s in range(len(reader.records))]
    col = pc.dictionary_encode(pa.chunked_array(parts, pa.string())).combine_chunks()
    names = np.array([*(v or "" for v in col.dictionary.to_pylist()), ""], dtype=object)
    codes = col.indices.fill_null(len(names) - 1).to_numpy(zero_copy_only=False)
    return names[codes]


def _keep_table(reader: ColumnReader, keep: np.ndarray) -> pa.Table:
    """``row`` and ``id`` of every kept row, shard by shard."""
    parts = []
    for s in range(len(reader.records)):
        lo, hi = int(reader.offsets.starts[s]), int(reader.offsets.starts[s + 1])
        sel = np.flatnonzero(keep[lo:hi])
        ids = reader.read_shard(s, ["id"]).column(0)
        parts.append(pa.table({"row": pa.array(lo + sel, pa.int64()),
                               "id": ids.take(pa.array(sel, pa.int64()))}))
    schema = pa.schema([("row", pa.int64()), ("id", pa.string())])
    return pa.concat_tables(parts) if parts else schema.empty_table()


def _thumbnails(manifest: EmbedManifest, reader: ColumnReader) -> Callable[[int], Any]:
    """``row -> PIL image | None`` from the run's image source (None: drawn grey); only
    for a run sealed on this machine, as serve (an edited manifest names any folder)."""
    source = source_from_dict(manifest.image_source) if manifest.trusted else None

    def thumb(row: int) -> Any:
        if source is None:
            return None
        try:
            key = reader.read_rows([row], ["image"]).column(0)[0].as_py()
            return decode_image(source.read(key), manifest.max_pixels) if key else None
        except (ImageError, UserError, OSError, ValueError):
            return None
    return thumb

