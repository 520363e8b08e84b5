"""Index stage: one index per embedding column of a run, kept in step with its shards.

Index row ``i`` is row ``i`` of the column's shards concatenated in embed-manifest order,
so the embed shards map hits back to records; each index entry lists the shards (file,
rows) it covers.  The build streams the shards (:mod:`embeddings.index` picks the index,
the builder and the sizes under ``[index] memory_budget_gb``, which bounds the whole
build); a rerun after the embed stage gained shards reads only the new shards and adds
their rows, even when the automatic choice for the new size would differ (it says so:
``--rebuild`` switches).  Vectors of another model are refused; an index file that fails
its checksum is rebuilt.  Files and manifest belong to :mod:`embeddings.store.index`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

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
    still_held,
)

from .config import IndexConfig
from .leaks import kept_mask

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
    with run.lock("index") as lock:
        # Ray tasks stop writing parts once this process no longer holds the lock.
        alive = partial(still_held, run.index.dir, lock.token) if cfg.engine == "ray" else None
        entries = run.index.entries(ignore_damage=cfg.rebuild)  # --rebuild: any state
        for column in columns:
            old = entries.get(column)
            spans = [ShardSpan(s.file, s.rows) for s in embed.shards[cols[column].kind]]
            result, entry = _update_column(cfg, run, cols[column], spans, old, gpu, alive)
            results.append(result)
            if result.action == "unchanged":
                continue
            entries[column] = entry
            run.index.write_entries(entries)
            if old and old.file != entry.file:
                run.index.remove(old)
        if cfg.dedup is not None:
            _mark_dedup(run, entries, [c for c in columns if cols[c].kind == "images"],
                        cfg.dedup, results)
        if any(r.action != "unchanged" for r in results):
            _warm_filters(run, {cols[c].kind for c in columns})
        for kind in sorted({cols[c].kind for c in columns if c in entries}):
            _hit_tables(cfg, run, kind)
        if entries and not run.index.trusted and all(r.action == "unchanged" for r in results):
            run.index.write_entries(entries)  # checked against the embed stage: seal it here
    return results


def _mark_dedup(run: Run, entries: dict[str, IndexEntry], columns: list[str], on: bool,
                results: list[ColumnResult]) -> None:
    """Record in each image column's entry whether searches keep to the keep-list
    (``--dedup``: checked against the shards now, so a stale keep-list is refused)."""
    if on:
        kept = int(kept_mask(run, run.embed.reader("images").offsets.total).sum())
    for c in columns:
        entries[c].stats.pop("dedup", None)
        if on:
            entries[c].stats["dedup"] = {"kept": kept,
                                         "report": run.dedup.summary()["updated"]}
    run.index.write_entries(entries)
    for i, r in enumerate(results):
        if r.column in columns:
            note = f"searches keep to the {kept} images of the dedup keep-list" if on else \
                "searches see every row"
            results[i] = replace(r, note="; ".join(x for x in (r.note, note) if x))


def _warm_filters(run: Run, kinds: set[str]) -> None:
    """Cache what serve and search filter by: the distinct splits and labels, and a bitmap
    per split (label bitmaps are made on first use: there can be thousands).  Bitmaps of
    the shards already covered are reused, so after an add only the new shards are read."""
    values = run.filters.values("images")
    for kind in sorted(kinds):
        for split in values["splits"]:
            run.filters.mask(kind, split, None)


def _hit_tables(cfg: IndexConfig, run: Run, kind: str) -> None:
    """What a search hit reads, per shard, memory-mappable (:mod:`embeddings.store.hits`):
    written for the shards that lack a current one (all of them on a run indexed by an
    older version, the new ones after an add, none otherwise)."""
    with tqdm(unit="row", desc=f"hit tables {kind}", disable=not cfg.progress,
              leave=False) as bar:

        def shown(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        n = run.embed.hits.build(kind, progress=shown)
    if n:
        log.info("hit tables: wrote %d for the %s shards", n, kind)


def check_config(cfg: IndexConfig) -> None:
    """Every [index] number in its range, before any work."""
    if cfg.memory_budget_gb <= 0 or not 0 < cfg.target_recall <= 1:
        raise InputError("[index] memory_budget_gb must be > 0 and target_recall in (0, 1]")
    if cfg.recall_queries < 1:
        raise InputError(f"[index] recall_queries (--recall-queries) must be >= 1, not "
                         f"{cfg.recall_queries}")
    if cfg.flat_max < 0 or not 0 <= cfg.recall_threshold <= 1:
        raise InputError("[index] flat_max must be >= 0 and recall_threshold in [0, 1]")
    if cfg.workers is not None and cfg.workers < 1:
        raise InputError(f"[index] workers must be >= 1, not {cfg.workers}")
    if cfg.engine == "ray":
        from .engines import check_engine

        check_engine("ray", cfg.ray_address)


def _update_column(cfg: IndexConfig, run: Run, col: Column, now: list[ShardSpan],
                   entry: IndexEntry | None, gpu: bool,
                   alive: Any = None) -> tuple[ColumnResult, IndexEntry]:
    if entry is None or cfg.rebuild:
        return _build(cfg, run, col, now, gpu, "rebuilt" if entry else "built",
                      "--rebuild" if entry else "", alive)
    check_same_model(entry.provenance, col.provenance, f"the {col.name} index in "
                     f"{run.index.dir}", REBUILD + " (or delete the index folder)")
    try:
        run.index.check(entry, full=cfg.verify, deep=True)
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
        return _add(cfg, run, col, entry, now, gpu, alive)
    why = sound or ("factory changed" if forced_other else "shards changed")
    return _build(cfg, run, col, now, gpu, "rebuilt", why, alive)


def _budget(cfg: IndexConfig) -> int:
    return int(cfg.memory_budget_gb * 2**30)


def _plan(cfg: IndexConfig, factory: str, n: int, d: int,
          on_disk: bool | None) -> ix.BuildPlan:
    nlist, code_size = ix.describe(factory, d)
    size = n * (code_size + 8) + nlist * d * 4 if nlist else n * code_size
    workers = cfg.workers or os.cpu_count() or 1
    return ix.plan_build(factory, n, d, _budget(cfg), size, nlist, code_size, on_disk,
                         cfg.engine, workers)


def _job(cfg: IndexConfig, run: Run, col: Column, plan: ix.BuildPlan, scratch: Path,
         gpu: bool, bar: tqdm, alive: Any) -> Any:
    return ix.BuildJob(run.embed.source(col.name, cfg.verify), plan, scratch,
                       n_queries=cfg.recall_queries, k=RECALL_K, gpu=gpu,
                       ray_address=cfg.ray_address, workers=cfg.workers or os.cpu_count() or 1,
                       progress=lambda done: bar.update(done - bar.n), alive=alive)


def _bar(cfg: IndexConfig, column: str, rows: int) -> tqdm:
    return tqdm(total=rows, unit="vec", desc=f"index {column}", disable=not cfg.progress,
                leave=False)


def _build(cfg: IndexConfig, run: Run, col: Column, now: list[ShardSpan], gpu: bool,
           action: str, note: str, alive: Any = None) -> tuple[ColumnResult, IndexEntry]:
    t0 = time.perf_counter()
    n = sum(s.rows for s in now)
    if n == 0:
        raise FormatError(f"column {col.name} of {run.path} has no vectors to index")
    if cfg.factory:
        choice = ix.IndexChoice(cfg.factory, {}, "forced with --factory / [index] factory")
    else:
        choice = ix.choose_index(n, col.dim, _budget(cfg), cfg.flat_max)
    plan = _plan(cfg, choice.factory, n, col.dim, choice.on_disk if not cfg.factory else None)
    log.info("%s: %d x %d -> %s (%s); %s build%s", col.name, n, col.dim, choice.factory,
             choice.reason, plan.builder, ", lists on disk" if plan.on_disk else "")
    with run.index.scratch() as scratch, _bar(cfg, col.name, n) as bar:
        built = ix.BUILDERS[plan.builder](_job(cfg, run, col, plan, scratch, gpu, bar, alive))
        entry = _save(cfg, run, col, now, plan, built, not cfg.factory, gpu)
    entry.stats.update(reason=choice.reason, build_seconds=round(time.perf_counter() - t0, 3),
                       built=entry.stats["updated"])
    return ColumnResult(col.name, action, entry.ntotal, plan.factory, entry.recall_at_10,
                        time.perf_counter() - t0, note), entry


def _add(cfg: IndexConfig, run: Run, col: Column, entry: IndexEntry, now: list[ShardSpan],
         gpu: bool, alive: Any = None) -> tuple[ColumnResult, IndexEntry]:
    t0 = time.perf_counter()
    n = sum(s.rows for s in now)
    notes = [f"+{n - entry.ntotal} vectors"]
    if entry.auto:
        choice = ix.choose_index(n, col.dim, _budget(cfg), cfg.flat_max)
        if choice.factory != entry.factory:
            notes.append(f"for {n} vectors the automatic choice is now {choice.factory}: "
                         f"kept {entry.factory} and added; --rebuild switches")
            log.warning("%s: %s", col.name, notes[-1])
    lists = run.index.lists_path(entry)
    index = _open(run.index.path(entry), entry, lists, for_add=True)
    if index.ntotal != entry.ntotal:
        raise IndexMismatch(f"{entry.file} holds {index.ntotal} vectors, its manifest says "
                            f"{entry.ntotal}: {REBUILD}")
    state = run.index.read_truth(entry)
    truth = ix.Truth.from_arrays(state) if state is not None else None
    plan = _plan(cfg, entry.factory, n, col.dim, True if lists else None)
    new_shards = list(range(len(entry.shards), len(now)))
    with run.index.scratch() as scratch, _bar(cfg, col.name, n - entry.ntotal) as bar:
        job = _job(cfg, run, col, plan, scratch, gpu, bar, alive)
        if truth is None:  # an index from before recall states were kept: measure afresh
            truth = _fresh_truth(job, len(entry.shards), entry.ntotal)
        built = ix.add_to(job, index, truth, new_shards, lists)
        new = _save(cfg, run, col, now, plan, built, entry.auto, gpu)
    keep = {k: entry.stats[k] for k in ("reason", "build_seconds", "built") if k in entry.stats}
    new.stats.update(keep, add_seconds=round(time.perf_counter() - t0, 3),
                     added_shards=len(new_shards))
    return ColumnResult(col.name, "added", new.ntotal, entry.factory, new.recall_at_10,
                        time.perf_counter() - t0, "; ".join(notes)), new


def _fresh_truth(job: Any, old_shards: int, old_rows: int) -> Any:
    """The recall state of the old rows, streamed (only for indexes without one)."""
    truth = ix.Truth.start(old_rows, job.n_queries, job.k)
    old = list(range(old_shards))
    for start, x in job.source.chunks(old, job.plan.chunk_rows):
        truth.take_queries(start, x)
    for start, x in job.source.chunks(old, job.plan.chunk_rows):
        truth.update(start, np.asarray(x, np.float32))
    return truth


def _save(cfg: IndexConfig, run: Run, col: Column, now: list[ShardSpan], plan: ix.BuildPlan,
          built: Any, auto: bool, gpu: bool) -> IndexEntry:
    """Write the index (and its lists and recall state), then tune and measure it."""
    with run.index.writing(col.name) as new:
        lists_tmp = new.tmp("lists") if built.index is None else None
        ix.write_built(built, new.tmp("index"), lists_tmp, new.name("lists"))
        with open(new.tmp("truth"), "wb") as f:
            np.savez(f, **built.truth.to_arrays())
    recs = new.records
    index = built.index
    if index is None:  # on-disk lists: measure the files as search will open them
        index = ix.load_index(run.index.dir / recs["index"]["file"],
                              lists=run.index.dir / recs["lists"]["file"])
    # Tuning maps on-disk lists: at most a quarter of the budget of them at once.
    params, recall, queries = ix.evaluate(index, built.truth, cfg.target_recall,
                                          max_mapped=_budget(cfg) // 4)
    ix.release_pages(index)
    _warn_recall(cfg, col.name, recall)
    return IndexEntry(
        column=col.name, kind=col.kind, file=recs["index"]["file"],
        bytes=recs["index"]["bytes"], digest=recs["index"]["digest"], factory=plan.factory,
        params=params, ntotal=built.ntotal, dim=col.dim, shards=now,
        provenance=col.provenance, recall_at_10=round(float(recall), 4), auto=auto,
        stats={"metric": "inner_product", "memory_budget_bytes": _budget(cfg),
               "builder": plan.builder, "on_disk": plan.on_disk,
               "train_size": plan.train_size, "rows_read": built.rows_read,
               "recall_queries": queries,
               "target_recall": cfg.target_recall, "seconds": {
                   k: round(v, 3) for k, v in built.seconds.items()},
               "peak_rss_bytes": _peak_rss(), "device": "gpu" if gpu else "cpu",
               "faiss_version": ix.faiss_version(),
               "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        lists=recs.get("lists"), truth=recs.get("truth"))


def _peak_rss() -> int:
    """This process's peak resident memory (Linux), 0 where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _warn_recall(cfg: IndexConfig, column: str, recall: float) -> None:
    if recall < cfg.recall_threshold:
        log.warning("%s: recall@10 against exact search is %.3f, below %.2f: use a larger "
                    "memory budget or force an exact index (--factory Flat)",
                    column, recall, cfg.recall_threshold)


def _open(path: Path, entry: IndexEntry, lists: Path | None, for_add: bool = False,
          mmap: bool = True, gpu: bool = False) -> Any:
    try:
        if for_add:  # never a mapped index: FAISS aborts when one is added to
            return ix.open_for_add(path, lists)
        return ix.load_index(path, mmap=mmap, params=entry.params, gpu=gpu,
                             factory=entry.factory, lists=lists)
    except RuntimeError as e:  # FAISS could not parse it
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise FormatError(f"index file {path} is corrupt ({last}): {REBUILD}") from None


# ---------------------------------------------------------------------- opening, search

def open_index(run: str | Path, column: str, mmap: bool = True, device: str = "auto",
               verify: bool = True) -> tuple[Any, IndexEntry]:
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
    index = _open(path, entry, r.index.lists_path(entry), mmap=mmap,
                  gpu=ix.use_gpu(device))
    if index.ntotal != entry.ntotal:
        raise IndexMismatch(f"{path} holds {index.ntotal} vectors, its manifest says "
                            f"{entry.ntotal}: {REBUILD}")
    return index, entry


def allowed_rows(run: str | Path, kind: str, split: str | None = None,
                 label: str | None = None) -> np.ndarray | None:
    """Boolean mask of the ``kind`` rows matching ``split`` and ``label`` (None: all rows),
    from the bitmap cached beside the index (computed with Arrow compute once)."""
    return Run(run).filters.mask(kind, split, label)
