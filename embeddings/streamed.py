"""Feature rows that stay on disk: the heads' inputs when a run's features exceed the
memory budget.

A :class:`StreamedColumn` is one column of image-level features in the store's feature
cache (``RUN/heads/cache``, :mod:`embeddings.store.featcache`).  Indexing it with the
rows a head trains on gives :class:`Rows`, a lazy ``(n, dim)`` input: nothing is read
until a head asks for a chunk.  Rows are read a chunk of the file at a time (plain reads,
float16 as stored), only the rows asked for are kept, each chunk is checked for NaN/inf,
and a chunk or a mini-batch becomes float32 only when it is used.  The probe sums its
loss and gradient over the chunks (:mod:`embeddings.heads.lbfgs`); the torch heads draw
mini-batches from chunks taken in a shuffled order, rows shuffled within each
(:func:`epoch_batches`).

Heads that cannot stream get their rows as float32 arrays when those fit the budget, and
one error line naming the budget otherwise (:func:`materialise`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from .errors import InputError
from .features import check_finite_rows

CHUNK_ROWS = 65_536  # file rows per read: 64 MiB of 512-d float16
SAMPLE_ROWS = 131_072  # validation rows held in memory for early stopping / model choice


class Source(Protocol):
    """What a streamed column reads from (:class:`embeddings.store.featcache.CachedColumn`)."""

    rows: int
    dim: int
    column: str

    def read(self, start: int, stop: int) -> np.ndarray: ...


class StreamedColumn:
    """One column of ``rows`` image-level features on disk; ``budget``: the bytes the
    heads may hold in memory (what :func:`materialise` and the error lines name)."""

    def __init__(self, source: Source, budget: int) -> None:
        self.source, self.budget = source, int(budget)
        self.shape = (source.rows, source.dim)
        self.dtype = np.dtype(np.float16)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> Rows:
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return Rows(self, np.sort(rows.astype(np.int64)))


class Rows:
    """Rows ``rows`` (sorted) of a :class:`StreamedColumn`: a lazy ``(n, dim)`` input."""

    def __init__(self, column: StreamedColumn, rows: np.ndarray) -> None:
        self.column, self.rows = column, rows
        self.shape = (len(rows), column.shape[1])
        self.dtype = column.dtype
        self.budget = column.budget
        self.size = self.shape[0] * self.shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes32(self) -> int:
        """Bytes of these rows as one float32 array."""
        return self.size * 4

    def spans(self, chunk_rows: int | None = None) -> list[tuple[int, int]]:
        """Position ranges ``[p0, p1)`` whose rows lie in one ``chunk_rows`` block of the
        file (a read each; default :data:`CHUNK_ROWS`)."""
        chunk_rows = chunk_rows or CHUNK_ROWS
        if not len(self.rows):
            return []
        edges = np.searchsorted(self.rows, np.arange(0, int(self.rows[-1]) + chunk_rows + 1,
                                                     chunk_rows))
        return [(int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]

    def read_span(self, p0: int, p1: int) -> torch.Tensor:
        """Rows at positions ``p0:p1`` as float32, NaN/inf checked (on the float32 copy:
        numpy's float16 loops are emulated and cost more than the read)."""
        rows = self.rows[p0:p1]
        first = int(rows[0])
        block = torch.from_numpy(self.column.source.read(first, int(rows[-1]) + 1))
        if len(block) != len(rows):
            block = block.index_select(0, torch.from_numpy(rows - first))
        out = block.float()
        if not bool(torch.isfinite(out).all()):
            check_finite_rows(out.numpy(), f"embedding column {self.column.source.column!r}")
        return out

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Rows at sorted ``positions`` as one float32 array (one pass over their spans)."""
        out = np.empty((len(positions), self.shape[1]), np.float32)
        done = 0
        for p0, p1 in self.spans():
            lo, hi = np.searchsorted(positions, [p0, p1])
            if hi > lo:
                part = self.read_span(p0, p1)[torch.from_numpy(positions[lo:hi] - p0)]
                out[done:done + hi - lo] = part.numpy()
                done += hi - lo
        return out


def is_streamed(xs: Sequence[Any]) -> bool:
    return any(isinstance(x, Rows) for x in xs)


def float32(x: np.ndarray) -> torch.Tensor:
    """A float16 (or float32) array as a float32 tensor (torch converts 4x faster)."""
    return torch.from_numpy(np.ascontiguousarray(x)).float()


def chunks(xs: Sequence[Rows], chunk_rows: int | None = None
           ) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """(first position, float32 rows of every input) per span of the first input."""
    for p0, p1 in xs[0].spans(chunk_rows):
        yield p0, [x.read_span(p0, p1) for x in xs]


def column_stats(x: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) standard deviation per feature, float64 sums chunk by
    chunk (float32, like ``torch.std_mean(..., correction=0)`` of the whole array)."""
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros(x.shape[1], dtype=torch.float64)
    for _, (part,) in chunks([x]):
        t = part.double()
        s += t.sum(0)
        s2 += t.square().sum(0)
    n = max(len(x), 1)
    mean = s / n
    var = (s2 / n - mean.square()).clamp_min(0)
    return mean.float().numpy(), var.sqrt().float().numpy()


def gather(xs: Sequence[Any], positions: np.ndarray) -> list[np.ndarray]:
    """Rows at ``positions`` of each input as float32 arrays (in memory or streamed)."""
    positions = np.sort(np.asarray(positions, np.int64))
    return [x.take(positions) if isinstance(x, Rows)
            else np.ascontiguousarray(x[positions], np.float32) for x in xs]


def sample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """At most ``limit`` (default :data:`SAMPLE_ROWS`) sorted positions of ``n``, seeded
    (all when ``n <= limit``)."""
    limit = limit or SAMPLE_ROWS
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def materialise(xs: Sequence[Any], head: str) -> list[np.ndarray]:
    """Streamed inputs as float32 arrays for a head that cannot stream, if they fit in
    the memory budget; else one error line naming it."""
    streamed = [x for x in xs if isinstance(x, Rows)]
    if not streamed:
        return list(xs)
    need = sum(x.nbytes32 for x in streamed)
    budget = streamed[0].budget
    if need > budget / 2:
        raise InputError(f"head {head!r} trains on whole arrays: {need / 2**30:.1f} GiB of "
                         f"float32 features, more than half the heads' memory budget of "
                         f"{budget / 2**30:.1f} GiB ([heads] memory_budget_gb): drop it from "
                         "--heads (logistic and the torch heads stream) or raise the budget")
    return gather(xs, np.arange(len(xs[0])))


def epoch_batches(xs: Sequence[Rows], ys: Sequence[torch.Tensor], batch: int,
                  gen: torch.Generator,
                  transform: Callable[[list[torch.Tensor]], list[torch.Tensor]],
                  chunk_rows: int | None = None
                  ) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """One epoch of mini-batches: spans in a shuffled order, rows shuffled within each,
    rows left over at the end of a span carried into the next batch (every batch but the
    last has ``batch`` rows); ``transform`` (standardisation) applied to each float32
    batch.  Drawn from ``gen``: a rerun gives the same batches."""
    spans = xs[0].spans(chunk_rows)
    carry_x: list[torch.Tensor] = []
    carry_y: list[torch.Tensor] = []
    for s in torch.randperm(len(spans), generator=gen).tolist():
        p0, p1 = spans[s]
        parts = [x.read_span(p0, p1) for x in xs]
        order = torch.randperm(p1 - p0, generator=gen)
        px = [t[order] for t in parts]
        py = [y[p0:p1][order] for y in ys]
        if carry_x:
            px = [torch.cat([c, t]) for c, t in zip(carry_x, px, strict=True)]
            py = [torch.cat([c, t]) for c, t in zip(carry_y, py, strict=True)]
        full = len(px[0]) // batch * batch
        for i in range(0, full, batch):
            yield transform([t[i:i + batch] for t in px]), [t[i:i + batch] for t in py]
        carry_x, carry_y = [t[full:] for t in px], [t[full:] for t in py]
    if carry_x and len(carry_x[0]):
        yield transform(carry_x), carry_y


class Batches(list):
    """A torch head's streamed training inputs (the :class:`Rows` of each column, so
    ``len(tx[0])`` is the row count) with the standardisation applied to each batch."""

    def __init__(self, xs: Sequence[Rows],
                 transform: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> None:
        super().__init__(xs)
        self.transform = transform

    def epoch(self, ys: Sequence[torch.Tensor], batch: int, gen: torch.Generator
              ) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        return epoch_batches(self, ys, batch, gen, self.transform)

    def head(self, rows: int) -> list[torch.Tensor]:
        """The first ``rows`` rows, float32 and transformed (as ``t[:rows]`` of arrays;
        they lie in the first chunks, so this reads little)."""
        return self.transform([torch.from_numpy(a)
                               for a in gather(self, np.arange(min(rows, len(self[0]))))])
