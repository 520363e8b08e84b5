"""Index stage: one FAISS index per embedding column of a run, kept in step with its shards.

Layout (schema version 1)::

    RUN/index/manifest.json               written last, atomically, after each column
    RUN/index/<column>.<token>.faiss      one index per embedding column

Index row ``i`` is row ``i`` of the column's shards concatenated in embed-manifest order,
so :func:`embeddings.shards.read_table` maps hits back to records; the manifest lists the
shards (file, rows) each index covers.  A rerun after the embed stage gained shards adds
only the new rows when the index type allows it (it always does for a trained index,
unless the automatic choice for the new size differs: then it rebuilds).  Vectors of a
different model are refused.  Index files get a fresh name on every write and the old
file is removed only after the manifest points at the new one, so a crash never leaves a
manifest describing an index it does not have.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from embeddings import index as ix
from embeddings import shards

from .config import checked_section

log = logging.getLogger(__name__)
STAGE_DIR = "index"
MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
RECALL_K = 10
HINT = "run `make index` (python -m pipeline index)"


class IndexMismatch(ValueError):
    """The index and the embeddings disagree (other model, missing or stale index)."""


@dataclass(frozen=True)
class IndexConfig:
    run: str = "runs/demo"
    columns: tuple[str, ...] = ()  # empty: every embedding column of the run
    memory_budget_gb: float = 4.0  # for the index of one column
    factory: str = ""  # force a FAISS factory string ("HNSW32", "IVF1024,Flat", ...)
    flat_max: int = ix.FLAT_MAX  # exact search up to this many vectors
    target_recall: float = 0.95  # nprobe / efSearch are tuned to reach this recall@10
    recall_threshold: float = 0.9  # warn when the measured recall@10 is below
    recall_queries: int = 500  # held-out queries for tuning, as many again for measuring
    device: str = "auto"  # auto | cpu | cuda (needs a GPU build of FAISS)
    rebuild: bool = False  # rebuild from scratch (also after a model change)


def index_config(raw: dict[str, Any], **overrides: Any) -> IndexConfig:
    """The ``[index]`` section of a parsed TOML config (``run`` from ``out``), plus overrides."""
    section = dict(checked_section(IndexConfig, dict(raw.get("index", {})), "index"))
    section.setdefault("run", raw.get("out", IndexConfig.run))
    section["columns"] = tuple(section.get("columns", ()))
    ov = {k: v for k, v in overrides.items() if v is not None}
    if "columns" in ov:
        ov["columns"] = tuple(ov["columns"])
    cfg = replace(IndexConfig(**section), **ov)
    if cfg.memory_budget_gb <= 0 or not 0 < cfg.target_recall <= 1:
        raise ValueError("[index] memory_budget_gb must be > 0 and target_recall in (0, 1]")
    return cfg


@dataclass(frozen=True)
class ColumnResult:
    column: str
    action: str  # built | added | rebuilt | unchanged
    ntotal: int
    factory: str
    recall: float
    seconds: float
    note: str = ""


def stage_dir(run: str | Path) -> Path:
    return Path(run) / STAGE_DIR


def read_index_manifest(run: str | Path) -> dict[str, Any] | None:
    path = stage_dir(run) / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise shards.FormatError(f"{path} has schema version {manifest.get('schema_version')}, "
                                 f"this version reads {SCHEMA_VERSION}: rebuild with --rebuild")
    return manifest


def run_index(cfg: IndexConfig) -> list[ColumnResult]:
    """Build or update the index of every selected column of ``cfg.run``."""
    embed = shards.read_manifest(cfg.run)
    columns = list(cfg.columns) or list(embed["columns"])
    for c in columns:
        shards.column_info(embed, c)  # unknown column: a clear FormatError now
    if cfg.factory:
        for c in columns:
            ix.check_factory(cfg.factory, int(embed["columns"][c]["dim"]))
    gpu = ix.use_gpu(cfg.device)
    manifest = read_index_manifest(cfg.run) or {
        "schema_version": SCHEMA_VERSION, "stage": "index", "indexes": {}}
    results = []
    for column in columns:
        old = manifest["indexes"].get(column)
        result, entry = _update_column(cfg, embed, column, old, gpu)
        old_file = old["file"] if old else None
        results.append(result)
        if result.action == "unchanged":
            continue
        manifest["indexes"][column] = entry
        manifest["updated"] = _now()
        shards.atomic_write_json(stage_dir(cfg.run) / MANIFEST, manifest)
        if old_file and old_file != entry["file"]:
            (stage_dir(cfg.run) / old_file).unlink(missing_ok=True)
    return results


def _update_column(cfg: IndexConfig, embed: dict[str, Any], column: str,
                   entry: dict[str, Any] | None,
                   gpu: bool) -> tuple[ColumnResult, dict[str, Any]]:
    info = shards.column_info(embed, column)
    now = _shard_list(embed, info["kind"])
    if entry and not cfg.rebuild:
        check_provenance(cfg.run, column, entry, info, hint="rebuild it with "
                         "`python -m pipeline index --rebuild` (or delete the index folder)")
        exists = (stage_dir(cfg.run) / entry["file"]).is_file()
        forced_other = bool(cfg.factory) and cfg.factory != entry["factory"]
        if exists and not forced_other and entry["shards"] == now:
            return (ColumnResult(column, "unchanged", entry["ntotal"], entry["factory"],
                                 entry["recall_at_10"], 0.0), entry)
        old = entry["shards"]
        if exists and not forced_other and now[:len(old)] == old:
            why_not = _why_rebuild(cfg, entry, info, sum(s["rows"] for s in now))
            if why_not is None:
                return _add(cfg, column, entry, info, now, gpu)
            log.info("%s: rebuilding (%s)", column, why_not)
            return _build(cfg, column, info, now, gpu, "rebuilt", why_not)
        why = ("index file missing" if not exists else "factory changed" if forced_other
               else "shards changed")
        return _build(cfg, column, info, now, gpu, "rebuilt", why)
    return _build(cfg, column, info, now, gpu, "rebuilt" if entry else "built",
                  "--rebuild" if entry else "")


def _why_rebuild(cfg: IndexConfig, entry: dict[str, Any], info: dict[str, Any],
                 n: int) -> str | None:
    """Why adding to the existing index is not right for ``n`` vectors, or None."""
    if not entry.get("auto"):
        return None  # a forced factory stays what the user asked for
    choice = ix.choose_index(n, int(info["dim"]), _budget(cfg), cfg.flat_max)
    if choice.factory != entry["factory"]:
        return f"for {n} vectors the chosen index is now {choice.factory}"
    return None


def _budget(cfg: IndexConfig) -> int:
    return int(cfg.memory_budget_gb * 2**30)


def _build(cfg: IndexConfig, column: str, info: dict[str, Any], now: list[dict[str, Any]],
           gpu: bool, action: str, note: str) -> tuple[ColumnResult, dict[str, Any]]:
    t0 = time.perf_counter()
    vectors = shards.read_vectors(cfg.run, column)
    if len(vectors) == 0:
        raise shards.FormatError(f"column {column} of {cfg.run} has no vectors to index")
    if cfg.factory:
        choice = ix.IndexChoice(cfg.factory, {}, "forced with --factory / [index] factory")
    else:
        choice = ix.choose_index(len(vectors), vectors.shape[1], _budget(cfg), cfg.flat_max)
    log.info("%s: %d x %d -> %s (%s)", column, *vectors.shape, choice.factory, choice.reason)
    built = ix.build_and_measure(vectors, choice.factory, k=RECALL_K,
                                 target_recall=cfg.target_recall,
                                 n_queries=cfg.recall_queries, gpu=gpu)
    entry = _entry(cfg, column, info, now, choice.factory, built.index, built.params,
                   built.recall, built.queries, gpu)
    entry.update(auto=not cfg.factory, reason=choice.reason,
                 build_seconds=round(built.seconds, 3), built=entry["updated"])
    seconds = time.perf_counter() - t0
    _warn_recall(cfg, column, built.recall)
    return ColumnResult(column, action, built.index.ntotal, choice.factory, built.recall,
                        seconds, note), entry


def _add(cfg: IndexConfig, column: str, entry: dict[str, Any], info: dict[str, Any],
         now: list[dict[str, Any]], gpu: bool) -> tuple[ColumnResult, dict[str, Any]]:
    t0 = time.perf_counter()
    start = entry["ntotal"]
    # Never mmap here: FAISS aborts the process when a mapped index is added to.
    index = ix.load_index(stage_dir(cfg.run) / entry["file"], mmap=False)
    if index.ntotal != start:
        raise IndexMismatch(f"{entry['file']} holds {index.ntotal} vectors, its manifest says "
                            f"{start}; rebuild with `python -m pipeline index --rebuild`")
    vectors = shards.read_vectors(cfg.run, column)
    index = ix.add_vectors(index, vectors[start:], gpu=gpu, factory=entry["factory"])
    params, recall, nq = ix.measure(index, vectors, RECALL_K, cfg.target_recall,
                                    cfg.recall_queries)
    new = _entry(cfg, column, info, now, entry["factory"], index, params, recall, nq, gpu)
    keep = ("auto", "reason", "build_seconds", "built")
    new.update({k: entry[k] for k in keep}, add_seconds=round(time.perf_counter() - t0, 3))
    _warn_recall(cfg, column, recall)
    return ColumnResult(column, "added", index.ntotal, entry["factory"], recall,
                        time.perf_counter() - t0, f"+{len(vectors) - start} vectors"), new


def _entry(cfg: IndexConfig, column: str, info: dict[str, Any], now: list[dict[str, Any]],
           factory: str, index: faiss.Index, params: dict[str, int], recall: float, queries: int,
           gpu: bool) -> dict[str, Any]:
    name = f"{column}.{secrets.token_hex(4)}.faiss"
    path = stage_dir(cfg.run) / name
    ix.save_index(index, path)
    return {
        "file": name, "column": column, "kind": info["kind"], "factory": factory,
        "metric": "inner_product", "params": params, "ntotal": int(index.ntotal),
        "dim": int(index.d), "bytes": path.stat().st_size,
        "memory_budget_bytes": _budget(cfg), "shards": now, "provenance": info,
        "recall_at_10": round(float(recall), 4), "recall_queries": queries,
        "target_recall": cfg.target_recall, "device": "gpu" if gpu else "cpu",
        "faiss_version": faiss.__version__, "updated": _now(),
    }


def _warn_recall(cfg: IndexConfig, column: str, recall: float) -> None:
    if recall < cfg.recall_threshold:
        log.warning("%s: recall@10 against exact search is %.3f, below %.2f: use a larger "
                    "memory budget or force an exact index (--factory Flat)",
                    column, recall, cfg.recall_threshold)


def _shard_list(embed: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [{"file": s["file"], "rows": int(s["rows"])} for s in embed["shards"][kind]]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_provenance(run: str | Path, column: str, entry: dict[str, Any],
                     info: dict[str, Any], hint: str) -> None:
    """IndexMismatch unless the index was built from vectors of the same model."""
    old, new = entry["provenance"], info
    if json.dumps(old, sort_keys=True) == json.dumps(new, sort_keys=True):
        return
    key = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
    raise IndexMismatch(
        f"the {column} index in {stage_dir(run)} holds vectors of a different model than the "
        f"embeddings now in {run} ({key}: index {old.get(key)!r}, embeddings "
        f"{new.get(key)!r}); refusing to mix them: {hint}")


# ---------------------------------------------------------------------- opening, search

def open_index(run: str | Path, column: str, mmap: bool = True,
               device: str = "auto") -> tuple[faiss.Index, dict[str, Any]]:
    """The index of ``column`` and its manifest entry, checked against the embed shards.

    Missing, stale (the embed stage has rows it lacks) or other-model indexes raise
    :class:`IndexMismatch` saying what to run.
    """
    embed = shards.read_manifest(run)
    info = shards.column_info(embed, column)
    manifest = read_index_manifest(run)
    if manifest is None or column not in manifest["indexes"]:
        raise IndexMismatch(f"no index for column {column} in {stage_dir(run)}: {HINT}")
    entry = manifest["indexes"][column]
    check_provenance(run, column, entry, info,
                     hint="rebuild with `python -m pipeline index --rebuild`")
    now = _shard_list(embed, info["kind"])
    if entry["shards"] != now:
        covered = {s["file"] for s in entry["shards"]}
        missing = sum(s["rows"] for s in now if s["file"] not in covered)
        raise IndexMismatch(
            f"the {column} index is stale: it covers {entry['ntotal']} rows, the embed stage "
            f"now has {sum(s['rows'] for s in now)} ({missing} in shards it lacks): {HINT}")
    path = stage_dir(run) / entry["file"]
    if not path.is_file():
        raise IndexMismatch(f"index file {path} is missing: {HINT}")
    index = ix.load_index(path, mmap=mmap, params=entry["params"],
                          gpu=ix.use_gpu(device), factory=entry["factory"])
    if index.ntotal != entry["ntotal"]:
        raise IndexMismatch(f"{path} holds {index.ntotal} vectors, its manifest says "
                            f"{entry['ntotal']}: rebuild with `python -m pipeline index --rebuild`")
    return index, entry


def allowed_rows(run: str | Path, kind: str, split: str | None = None,
                 label: str | None = None) -> np.ndarray | None:
    """Boolean mask of the ``kind`` rows matching ``split`` and ``label`` (None: all rows)."""
    if split is None and label is None:
        return None
    table = shards.read_table(run, kind, ["split", "label", "labels"])
    mask = np.ones(table.num_rows, dtype=bool)
    if split is not None:
        mask &= np.array([s == split for s in table.column("split").to_pylist()], dtype=bool)
    if label is not None:
        labels = table.column("labels").to_pylist()
        mask &= np.array([label == a or label in (b or []) for a, b in
                          zip(table.column("label").to_pylist(), labels)], dtype=bool)
    return mask
