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
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

from .choice import GROWTH, BuildPlan, reserve
from .core import (
    add_vectors,
    as_f32,
    deserialize,
    empty_like,
    ivf_of,
    limit_scratch,
    serialize,
    train_index,
    trim_memory,
)
from .memory import train_rows
from .ondisk import InMemory, Lists, assemble, merge, ondisk_lists, write_part
from .recall import Truth

log = logging.getLogger(__name__)


class VectorSource(Protocol):
    """A column, shard by shard (the store's ``ColumnSource``; picklable for Ray)."""

    dim: int
    shard_rows: Sequence[int]

    def chunks(self, shards: Sequence[int] | None = None,
               chunk_rows: int = 65_536) -> Iterator[tuple[int, np.ndarray]]: ...


@dataclass
class BuildJob:
    source: VectorSource
    plan: BuildPlan
    scratch: Path  # part files (a folder every Ray worker sees)
    n_queries: int = 500
    k: int = 10
    seed: int = 0
    gpu: bool = False
    trained: bytes | None = None  # a trained empty index: skip training
    ray_address: str | None = None
    workers: int = 2
    progress: Callable[[int], None] | None = None  # rows added so far

    @property
    def n(self) -> int:
        return int(sum(self.source.shard_rows))


@dataclass
class Built:
    """What a builder made: ``index`` in memory, or ``parts`` to merge into on-disk lists."""

    trained: faiss.Index  # empty, trained (the quantizer and codec of the lists)
    truth: Truth
    index: faiss.Index | None = None
    parts: list[Lists] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ntotal(self) -> int:
        if self.index is not None:
            return int(self.index.ntotal)
        return int(sum(int(p.sizes.sum()) for p in self.parts))


BUILDERS: dict[str, Callable[[BuildJob], Built]] = {}


def register_builder(name: str) -> Callable[[Callable[[BuildJob], Built]],
                                            Callable[[BuildJob], Built]]:
    def add(fn: Callable[[BuildJob], Built]) -> Callable[[BuildJob], Built]:
        BUILDERS[name] = fn
        return fn
    return add


# --------------------------------------------------------------------------- training

def sample_pass(job: BuildJob) -> tuple[np.ndarray, Truth]:
    """One streaming pass: the training sample and the query vectors of the truth."""
    rows = train_rows(job.n, job.plan.train_size, job.seed)
    sample = np.empty((len(rows), job.source.dim), np.float32)
    truth = Truth.start(job.n, job.n_queries, job.k, job.seed)
    for start, x in job.source.chunks(None, job.plan.chunk_rows):
        lo, hi = np.searchsorted(rows, [start, start + len(x)])
        sample[lo:hi] = x[rows[lo:hi] - start]
        truth.take_queries(start, x)
    return sample, truth


def trained_for(job: BuildJob, sample: np.ndarray | None) -> faiss.Index:
    limit_scratch(reserve(job.plan.budget) // 2)
    if job.trained is not None:
        return deserialize(job.trained)
    return train_index(job.plan.factory, sample, job.seed, job.gpu)


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
    return Built(trained, truth, index=index,
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


def add_shards(job: BuildJob, trained: faiss.Index, truth: Truth,
               shards: Sequence[int] | None, into: faiss.Index | None = None) -> Built:
    """Add the rows of ``shards`` (None: all) to a copy of ``trained`` (or to ``into``),
    updating ``truth``; spills parts when the plan puts the lists on disk."""
    t0 = time.perf_counter()
    index = into if into is not None else deserialize(serialize(trained))
    ivf = ivf_of(index) is not None
    parts: list[Lists] = []
    done = 0
    for start, x in job.source.chunks(shards, job.plan.chunk_rows):
        x = as_f32(x)
        add_vectors(index, x, job.gpu, job.plan.factory, start=start if ivf else None)
        truth.update(start, x)
        done += len(x)
        if job.progress:
            job.progress(done)
        if ivf and job.plan.on_disk and _held(index) >= job.plan.part_bytes:
            parts.append(spill(index, job.scratch))
    seconds = {"add": time.perf_counter() - t0}
    if ivf and job.plan.on_disk:
        if index.ntotal:
            parts.append(spill(index, job.scratch))
        trim_memory()
        return Built(trained, truth, parts=parts, seconds=seconds)
    return Built(trained, truth, index=index, seconds=seconds)


def _held(index: faiss.Index) -> int:
    ivf = ivf_of(index)
    return int(index.ntotal * (ivf.code_size + 8) * GROWTH)


def spill(index: faiss.Index, scratch: Path) -> Lists:
    """Write the lists of ``index`` to a new part file and empty it."""
    scratch.mkdir(parents=True, exist_ok=True)
    part = write_part(index, scratch / f"part-{time.time_ns()}-{secrets.token_hex(4)}.lists")
    ivf = ivf_of(index)
    ivf.invlists.reset()
    index.ntotal = ivf.ntotal = 0
    return part


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
        return Built(trained, truth, parts=[old, *new_parts], seconds=new.seconds)
    if not job.plan.on_disk:  # still fits: add in place
        return add_shards(job, trained, truth, shards, into=index)
    old_part = spill(index, job.scratch)  # now too big for memory: lists go to disk
    new = add_shards(job, trained, truth, shards)
    return Built(trained, truth, parts=[old_part, *new.parts], seconds=new.seconds)


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
