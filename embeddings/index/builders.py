"""Index builders, a registry: in memory, out of core, on Ray; and incremental adds.

Every builder takes a :class:`BuildJob` (a streaming :class:`VectorSource`, the
:class:`~.choice.BuildPlan` and a scratch folder) and returns a :class:`Built`: an
in-memory index, or the parts of on-disk lists still to merge, plus the exact
:class:`~.measure.Truth` of a seeded query sample gathered on the way (one pass adds the
rows and brute-forces the queries).  Training always uses the same seeded rows drawn
across all shards, so a builder given the same trained index (``BuildJob.trained``)
yields the same ids in the same lists whichever builder it is.

    BUILDERS["out_of_core"](job)      # or register_builder("mine")(fn) for another
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import faiss
import numpy as np

from .core import (
    add_vectors,
    deserialize,
    empty_like,
    ivf_of,
    serialize,
    trim_memory,
)
from .jobs import BuildJob, Built, VectorSource, add_shards, sample_pass, spill, trained_for
from .memory import train_rows
from .ondisk import InMemory, Lists, assemble, merge, ondisk_lists
from .recall import Truth

log = logging.getLogger(__name__)
__all__ = ["BUILDERS", "BuildJob", "Built", "VectorSource", "add_to", "in_memory",
           "register_builder", "write_built"]


BUILDERS: dict[str, Callable[[BuildJob], Built]] = {}


def register_builder(name: str) -> Callable[[Callable[[BuildJob], Built]],
                                            Callable[[BuildJob], Built]]:
    def add(fn: Callable[[BuildJob], Built]) -> Callable[[BuildJob], Built]:
        BUILDERS[name] = fn
        return fn
    return add


# --------------------------------------------------------------------------- builders

@register_builder("memory")
def build_in_memory(job: BuildJob) -> Built:
    """The whole column in memory as float32 (small runs: the plan checks it fits)."""
    t0 = time.perf_counter()
    x = np.empty((job.n, job.source.dim), np.float32)
    for start, chunk in job.source.chunks(None, job.plan.chunk_rows):
        x[start:start + len(chunk)] = chunk
    truth = Truth.start(job.n, job.n_queries, job.k, job.seed)
    truth.queries = x[truth.rows]
    t1 = time.perf_counter()
    trained = trained_for(job, None if job.trained else
                          x[train_rows(job.n, job.plan.train_size, job.seed)])
    t2 = time.perf_counter()
    index = add_vectors(deserialize(serialize(trained)), x, job.gpu, job.plan.factory)
    truth.update(0, x)
    if job.progress:
        job.progress(job.n)
    return Built(trained, truth, index=index, rows_read=job.n,
                 seconds={"read": t1 - t0, "train": t2 - t1, "add": time.perf_counter() - t2})


@register_builder("out_of_core")
def build_out_of_core(job: BuildJob) -> Built:
    """Train on the seeded sample, then add chunk by chunk; IVF lists past the part
    budget go to part files (merged into on-disk lists by :func:`write_built`)."""
    t0 = time.perf_counter()
    sample, truth = sample_pass(job)
    t1 = time.perf_counter()
    trained = trained_for(job, sample)
    del sample
    trim_memory()
    t2 = time.perf_counter()
    built = add_shards(job, trained, truth, None)
    built.seconds.update(sample=t1 - t0, train=t2 - t1)
    return built


@register_builder("ray")
def build_on_ray(job: BuildJob) -> Built:
    """Training here, adds on Ray tasks (a range of shards each), merged here."""
    from .ray_build import build

    return build(job)


# ------------------------------------------------------------------ incremental adds

def add_to(job: BuildJob, index: faiss.Index, truth: Truth, shards: Sequence[int],
           lists: Path | None = None) -> Built:
    """Add the rows of the new ``shards`` only, to ``index`` (opened for writing: in
    memory, or the header of on-disk ``lists``); ``truth`` gains the new rows too."""
    ivf = ivf_of(index) is not None
    if not ivf:
        return add_shards(job, index, truth, shards, into=index)
    trained = empty_like(index)
    if lists is not None:  # on-disk: the old lists, then the new parts
        old: Lists = ondisk_lists(index, lists)
        new = add_shards(job, trained, truth, shards)
        new_parts = new.parts if new.index is None else [InMemory(new.index)]
        return Built(trained, truth, parts=[old, *new_parts], seconds=new.seconds,
                     rows_read=new.rows_read)
    if not job.plan.on_disk:  # still fits: add in place
        return add_shards(job, trained, truth, shards, into=index)
    old_part = spill(index, job.scratch, job.alive)  # now too big for memory: lists go to disk
    new = add_shards(job, trained, truth, shards)
    return Built(trained, truth, parts=[old_part, *new.parts], seconds=new.seconds,
                 rows_read=new.rows_read)


# -------------------------------------------------------------------------- writing

def write_built(built: Built, header: Path, lists: Path | None, lists_name: str) -> bool:
    """Write the index file (and the lists file when on disk); True if lists were written."""
    if built.index is not None:
        faiss.write_index(built.index, str(header))
        return False
    if lists is None:
        raise ValueError("on-disk lists need a path for the lists file")
    merge(built.trained, built.parts, lists, header, lists_name)
    return True


def in_memory(built: Built) -> faiss.Index:
    """The built index in memory (parts assembled): for small on-disk results and tests."""
    return built.index if built.index is not None else assemble(built.trained, built.parts)
