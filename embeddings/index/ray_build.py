"""The Ray builder: the trained empty index goes to Ray tasks, each adds a range of shards
and writes its inverted lists as part files; the driver merges them in shard order.

The same rows in the same order give the same lists as the local out-of-core build
(:func:`.builders.add_shards` runs in each task).  At most ``workers`` tasks run at once
and each holds ``plan.part_bytes`` of codes (the plan gives each its share of the budget);
the scratch folder must be on a filesystem every node sees, like the run directory of
``embed --engine ray``.  Each task also brute-forces the truth's queries over its rows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from ..errors import InputError
from ..ray_cluster import connect
from .core import deserialize, serialize, set_threads, trim_memory
from .jobs import BuildJob, Built, add_shards, sample_pass, trained_for
from .ondisk import assemble
from .query import merge_topk
from .recall import Truth

log = logging.getLogger(__name__)
TASKS_PER_WORKER = 2  # smaller ranges balance a slow node; more parts to merge


def build(job: BuildJob) -> Built:
    import ray

    t0 = time.perf_counter()
    sample, truth = sample_pass(job)
    t1 = time.perf_counter()
    trained = trained_for(job, sample)
    del sample
    trim_memory()
    t2 = time.perf_counter()
    started = connect(job.ray_address)
    try:
        results = _run(ray, job, serialize(trained), truth)
    finally:
        if started:
            ray.shutdown()
    parts = [p for r in results for p in r["parts"]]
    truth.scores, truth.ids = merge_topk([truth.scores, *[r["scores"] for r in results]],
                                         [truth.ids, *[r["ids"] for r in results]], truth.depth)
    seconds = {"sample": t1 - t0, "train": t2 - t1, "add": time.perf_counter() - t2}
    rows = sum(r["rows"] for r in results)
    if job.plan.on_disk:
        return Built(trained, truth, parts=parts, seconds=seconds, rows_read=rows)
    return Built(trained, truth, index=assemble(trained, parts), parts=parts, seconds=seconds,
                 rows_read=rows)


def ranges(shard_rows: list[int], count: int) -> list[list[int]]:
    """``count`` contiguous ranges of shards with about equal rows (none empty)."""
    total = sum(shard_rows)
    count = max(1, min(count, len(shard_rows)))
    out: list[list[int]] = [[]]
    seen = 0
    for s, rows in enumerate(shard_rows):
        if out[-1] and seen >= total * len(out) / count and len(out) < count:
            out.append([])
        out[-1].append(s)
        seen += rows
    return out


def _run(ray: Any, job: BuildJob, trained: bytes, truth: Truth) -> list[dict[str, Any]]:
    task = ray.remote(num_cpus=1, max_retries=2)(_add_range)
    light = replace(job, progress=None, trained=None)
    todo = ranges(list(job.source.shard_rows), job.workers * TASKS_PER_WORKER)
    pending: dict[Any, int] = {}
    results: dict[int, dict[str, Any]] = {}
    log.info("ray: %d shard ranges on %d worker(s)", len(todo), job.workers)
    for i, shards in enumerate(todo):
        while len(pending) >= job.workers:
            _collect(ray, pending, results, job)
        pending[task.remote(light, trained, truth, shards)] = i
    while pending:
        _collect(ray, pending, results, job)
    return [results[i] for i in range(len(todo))]


def _collect(ray: Any, pending: dict[Any, int], results: dict[int, dict[str, Any]],
             job: BuildJob) -> None:
    ready, _ = ray.wait(list(pending), num_returns=1)
    for ref in ready:
        i = pending.pop(ref)
        try:
            results[i] = ray.get(ref)
        except Exception as e:  # a user mistake on a worker is said on one line
            cause = getattr(e, "cause", None) or e.__cause__
            if isinstance(cause, InputError):
                raise cause from None
            raise
        if job.progress:
            job.progress(sum(r["rows"] for r in results.values()))


def _add_range(job: BuildJob, trained: bytes, truth: Truth, shards: list[int]
               ) -> dict[str, Any]:
    """One task: the rows of ``shards`` into parts, and the queries' exact neighbours
    among them (``truth`` arrives empty: the driver merges what each task found)."""
    set_threads(1)
    plan = replace(job.plan, on_disk=True)  # a task always hands its lists back as parts
    built = add_shards(replace(job, plan=plan), deserialize(trained), truth, shards)
    return {"parts": built.parts, "scores": truth.scores, "ids": truth.ids,
            "rows": sum(job.source.shard_rows[s] for s in shards)}
