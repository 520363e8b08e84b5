"""The steps every builder shares: the job, its result, the sampling pass, training, and
adding shards (spilling parts when the lists go on disk).  :mod:`.builders` composes them;
:mod:`.ray_build` runs :func:`add_shards` in Ray tasks.
"""

from __future__ import annotations

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
    ivf_of,
    limit_scratch,
    serialize,
    train_index,
    trim_memory,
)
from .memory import train_rows
from .ondisk import Lists, write_part
from .recall import Truth


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
    alive: Callable[[], bool] | None = None  # whether the driver still holds its lock

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
    rows_read: int = 0  # rows streamed to add (an incremental add: the new rows only)

    @property
    def ntotal(self) -> int:
        if self.index is not None:
            return int(self.index.ntotal)
        return int(sum(int(p.sizes.sum()) for p in self.parts))


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
            parts.append(spill(index, job.scratch, job.alive))
    seconds = {"add": time.perf_counter() - t0}
    if ivf and job.plan.on_disk:
        if index.ntotal:
            parts.append(spill(index, job.scratch, job.alive))
        trim_memory()
        return Built(trained, truth, parts=parts, seconds=seconds, rows_read=done)
    return Built(trained, truth, index=index, seconds=seconds, rows_read=done)


def _held(index: faiss.Index) -> int:
    ivf = ivf_of(index)
    return int(index.ntotal * (ivf.code_size + 8) * GROWTH)


class DriverGone(RuntimeError):
    """A Ray task found its driver's lock released: the build is no longer wanted."""


def spill(index: faiss.Index, scratch: Path, alive: Callable[[], bool] | None = None) -> Lists:
    """Write the lists of ``index`` to a new part file and empty it; nothing once
    ``alive`` says the driver is gone (a Ray task outliving a killed ``index``)."""
    if alive is not None and not alive():
        raise DriverGone(f"the driver of this index build is gone (its lock is no longer "
                         f"held): not writing into {scratch}")
    scratch.mkdir(parents=True, exist_ok=True)
    part = write_part(index, scratch / f"part-{time.time_ns()}-{secrets.token_hex(4)}.lists")
    ivf = ivf_of(index)
    ivf.invlists.reset()
    index.ntotal = ivf.ntotal = 0
    return part


