"""Index stage: one FAISS index per embedding column of a run, kept in step with its shards.

Index row ``i`` is row ``i`` of the column's shards concatenated in embed-manifest order,
so the embed shards map hits back to records; each index entry lists the shards (file,
rows) it covers.  A rerun after the embed stage gained shards adds only the new rows when
the index type allows it (a trained index does, unless the automatic choice for the new
size differs: then it rebuilds).  Vectors of another model are refused; an index file
that fails its checksum is rebuilt.  Files and manifest belong to
:mod:`embeddings.store.index`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from embeddings import index as ix
from embeddings.errors import FormatError, InputError, RunMismatch
from embeddings.store import (
    Column,
    IndexEntry,
    Run,
    ShardSpan,
    Tampered,
    check_name,
    check_same_model,
)

from .config import IndexConfig

log = logging.getLogger(__name__)
RECALL_K = 10
HINT = "run `make index` (python -m pipeline index)"
REBUILD = "rebuild it with `python -m pipeline index --rebuild`"


class IndexMismatch(RunMismatch):
    """The index and the embeddings disagree (other model, missing or stale index)."""


@dataclass(frozen=True)
class ColumnResult:
    column: str
    action: str  # built | added | rebuilt | unchanged
    ntotal: int
    factory: str
    recall: float
    seconds: float
    note: str = ""


def run_index(cfg: IndexConfig) -> list[ColumnResult]:
    """Build or update the index of every selected column of ``cfg.run``."""
    check_config(cfg)
    run = Run(cfg.run)
    embed = run.embed.manifest()
    columns = [check_name(c, "column") for c in (cfg.columns or embed.columns)]
    cols = {c: embed.column(c) for c in columns}  # unknown column: a clear error now
    if cfg.factory:
        for c in columns:
            ix.check_factory(cfg.factory, cols[c].dim)
    gpu = ix.use_gpu(cfg.device)
    results = []
    with run.lock("index"):
        entries = run.index.entries(ignore_damage=cfg.rebuild)  # --rebuild: any state
        for column in columns:
            old = entries.get(column)
            spans = [ShardSpan(s.file, s.rows) for s in embed.shards[cols[column].kind]]
            result, entry = _update_column(cfg, run, cols[column], spans, old, gpu)
            results.append(result)
            if result.action == "unchanged":
                continue
            entries[column] = entry
            run.index.write_entries(entries)
            if old and old.file != entry.file:
                run.index.remove(old.file)
        if entries and not run.index.trusted and all(r.action == "unchanged" for r in results):
            run.index.write_entries(entries)  # checked against the embed stage: seal it here
    return results


def check_config(cfg: IndexConfig) -> None:
    """Every [index] number in its range, before any work."""
    if cfg.memory_budget_gb <= 0 or not 0 < cfg.target_recall <= 1:
        raise InputError("[index] memory_budget_gb must be > 0 and target_recall in (0, 1]")
    if cfg.recall_queries < 1:
        raise InputError(f"[index] recall_queries (--recall-queries) must be >= 1, not "
                         f"{cfg.recall_queries}")
    if cfg.flat_max < 0 or not 0 <= cfg.recall_threshold <= 1:
        raise InputError("[index] flat_max must be >= 0 and recall_threshold in [0, 1]")


def _update_column(cfg: IndexConfig, run: Run, col: Column, now: list[ShardSpan],
                   entry: IndexEntry | None, gpu: bool) -> tuple[ColumnResult, IndexEntry]:
    if entry is None or cfg.rebuild:
        return _build(cfg, run, col, now, gpu, "rebuilt" if entry else "built",
                      "--rebuild" if entry else "")
    check_same_model(entry.provenance, col.provenance, f"the {col.name} index in "
                     f"{run.index.dir}", REBUILD + " (or delete the index folder)")
    try:
        run.index.check(entry, full=cfg.verify)
        sound = ""
    except Tampered:
        raise  # a link in the run: refused, not rebuilt
    except FormatError as e:
        log.warning("%s", e)
        sound = "index file missing or corrupt"
    forced_other = bool(cfg.factory) and cfg.factory != entry.factory
    if not sound and not forced_other and entry.shards == now:
        return (ColumnResult(col.name, "unchanged", entry.ntotal, entry.factory,
                             entry.recall_at_10, 0.0), entry)
    if not sound and not forced_other and now[:len(entry.shards)] == entry.shards:
        why_not = _why_rebuild(cfg, entry, col, sum(s.rows for s in now))
        if why_not is None:
            return _add(cfg, run, col, entry, now, gpu)
        log.info("%s: rebuilding (%s)", col.name, why_not)
        return _build(cfg, run, col, now, gpu, "rebuilt", why_not)
    why = sound or ("factory changed" if forced_other else "shards changed")
    return _build(cfg, run, col, now, gpu, "rebuilt", why)


def _why_rebuild(cfg: IndexConfig, entry: IndexEntry, col: Column, n: int) -> str | None:
    """Why adding to the existing index is not right for ``n`` vectors, or None."""
    if not entry.auto:
        return None  # a forced factory stays what the user asked for
    choice = ix.choose_index(n, col.dim, _budget(cfg), cfg.flat_max)
    if choice.factory != entry.factory:
        return f"for {n} vectors the chosen index is now {choice.factory}"
    return None


def _budget(cfg: IndexConfig) -> int:
    return int(cfg.memory_budget_gb * 2**30)


def _build(cfg: IndexConfig, run: Run, col: Column, now: list[ShardSpan], gpu: bool,
           action: str, note: str) -> tuple[ColumnResult, IndexEntry]:
    t0 = time.perf_counter()
    vectors = run.embed.read_vectors(col.name, verify=cfg.verify)
    if len(vectors) == 0:
        raise FormatError(f"column {col.name} of {run.path} has no vectors to index")
    if cfg.factory:
        choice = ix.IndexChoice(cfg.factory, {}, "forced with --factory / [index] factory")
    else:
        choice = ix.choose_index(len(vectors), vectors.shape[1], _budget(cfg), cfg.flat_max)
    log.info("%s: %d x %d -> %s (%s)", col.name, *vectors.shape, choice.factory, choice.reason)
    built = ix.build_and_measure(vectors, choice.factory, k=RECALL_K,
                                 target_recall=cfg.target_recall,
                                 n_queries=cfg.recall_queries, gpu=gpu)
    entry = _entry(cfg, run, col, now, choice.factory, built.index, built.params, built.recall,
                   built.queries, gpu, auto=not cfg.factory)
    entry.stats.update(reason=choice.reason, build_seconds=round(built.seconds, 3),
                       built=entry.stats["updated"])
    _warn_recall(cfg, col.name, built.recall)
    return ColumnResult(col.name, action, built.index.ntotal, choice.factory, built.recall,
                        time.perf_counter() - t0, note), entry


def _add(cfg: IndexConfig, run: Run, col: Column, entry: IndexEntry, now: list[ShardSpan],
         gpu: bool) -> tuple[ColumnResult, IndexEntry]:
    t0 = time.perf_counter()
    start = entry.ntotal
    # Never mmap here: FAISS aborts the process when a mapped index is added to.
    index = _read(run.index.path(entry), mmap=False, factory=entry.factory)
    if index.ntotal != start:
        raise IndexMismatch(f"{entry.file} holds {index.ntotal} vectors, its manifest says "
                            f"{start}: {REBUILD}")
    vectors = run.embed.read_vectors(col.name, verify=cfg.verify)
    index = ix.add_vectors(index, vectors[start:], gpu=gpu, factory=entry.factory)
    params, recall, nq = ix.measure(index, vectors, RECALL_K, cfg.target_recall,
                                    cfg.recall_queries)
    new = _entry(cfg, run, col, now, entry.factory, index, params, recall, nq, gpu, entry.auto)
    keep = {k: entry.stats[k] for k in ("reason", "build_seconds", "built") if k in entry.stats}
    new.stats.update(keep, add_seconds=round(time.perf_counter() - t0, 3))
    _warn_recall(cfg, col.name, recall)
    return ColumnResult(col.name, "added", index.ntotal, entry.factory, recall,
                        time.perf_counter() - t0, f"+{len(vectors) - start} vectors"), new


def _entry(cfg: IndexConfig, run: Run, col: Column, now: list[ShardSpan], factory: str,
           index: faiss.Index, params: dict[str, int], recall: float, queries: int, gpu: bool,
           auto: bool) -> IndexEntry:
    record = run.index.save(col.name, lambda path: faiss.write_index(index, str(path)))
    return IndexEntry(
        column=col.name, kind=col.kind, file=record["file"], bytes=record["bytes"],
        digest=record["digest"], factory=factory, params=params, ntotal=int(index.ntotal),
        dim=int(index.d), shards=now, provenance=col.provenance,
        recall_at_10=round(float(recall), 4), auto=auto,
        stats={"metric": "inner_product", "memory_budget_bytes": _budget(cfg),
               "recall_queries": queries, "target_recall": cfg.target_recall,
               "device": "gpu" if gpu else "cpu", "faiss_version": faiss.__version__,
               "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _warn_recall(cfg: IndexConfig, column: str, recall: float) -> None:
    if recall < cfg.recall_threshold:
        log.warning("%s: recall@10 against exact search is %.3f, below %.2f: use a larger "
                    "memory budget or force an exact index (--factory Flat)",
                    column, recall, cfg.recall_threshold)


def _read(path: Path, mmap: bool, factory: str, params: dict[str, int] | None = None,
          gpu: bool = False) -> faiss.Index:
    try:
        return ix.load_index(path, mmap=mmap, params=params, gpu=gpu, factory=factory)
    except RuntimeError as e:  # FAISS could not parse it
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise FormatError(f"index file {path} is corrupt ({last}): {REBUILD}") from None


# ---------------------------------------------------------------------- opening, search

def open_index(run: str | Path, column: str, mmap: bool = True, device: str = "auto",
               verify: bool = True) -> tuple[faiss.Index, IndexEntry]:
    """The index of ``column`` and its entry, checked against the embed shards.

    Missing, stale (the embed stage has rows it lacks), corrupt or other-model indexes
    raise a :class:`~embeddings.errors.UserError` saying what to run.
    """
    r = Run(run)
    embed = r.embed.manifest()
    col = embed.column(column)
    entry = r.index.entries().get(column)
    if entry is None:
        raise IndexMismatch(f"no index for column {column} in {r.index.dir}: {HINT}")
    check_same_model(entry.provenance, col.provenance, f"the {column} index in {r.index.dir}",
                     REBUILD)
    now = [ShardSpan(s.file, s.rows) for s in embed.shards[col.kind]]
    if entry.shards != now:
        covered = {s.file for s in entry.shards}
        missing = sum(s.rows for s in now if s.file not in covered)
        raise IndexMismatch(
            f"the {column} index is stale: it covers {entry.ntotal} rows, the embed stage "
            f"now has {sum(s.rows for s in now)} ({missing} in shards it lacks): {HINT}")
    path = r.index.check(entry, full=verify)
    index = _read(path, mmap, entry.factory, entry.params, ix.use_gpu(device))
    if index.ntotal != entry.ntotal:
        raise IndexMismatch(f"{path} holds {index.ntotal} vectors, its manifest says "
                            f"{entry.ntotal}: {REBUILD}")
    return index, entry


def allowed_rows(run: str | Path, kind: str, split: str | None = None,
                 label: str | None = None) -> np.ndarray | None:
    """Boolean mask of the ``kind`` rows matching ``split`` and ``label`` (None: all rows)."""
    if split is None and label is None:
        return None
    table = Run(run).embed.read_table(kind, ["split", "label", "labels"])
    mask = np.ones(table.num_rows, dtype=bool)
    if split is not None:
        mask &= np.array([s == split for s in table.column("split").to_pylist()], dtype=bool)
    if label is not None:
        labels = table.column("labels").to_pylist()
        mask &= np.array([label == a or label in (b or []) for a, b in
                          zip(table.column("label").to_pylist(), labels)], dtype=bool)
    return mask

