"""Which FAISS index for n vectors of dimension d under a memory budget (policy only).

The choice follows autofaiss: exact search while it is small enough, a graph (HNSW) in
the middle tier, else an inverted file (IVF), compressed (SQ8, then PQ) when the memory
budget demands it.  The thresholds are set from measurements, recorded below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InputError

# Tiers measured on real MiniLM embeddings (dictionary words, Debian package descriptions)
# and on a clustered synthetic mixture (benchmarks/bench_search.py --tiers; README).  On
# real embeddings IVF with ~sqrt(n) lists needed nprobe = half its lists for recall@10
# 0.95 and was slower than Flat (160k words: IVF512 419 q/s, Flat 1,566, HNSW32 5,960 at
# 0.974); HNSW32 was 2.5-4x Flat.  On the synthetic mixture IVF won (200k: 3,423 q/s vs
# 850 for HNSW), so tiers chosen on synthetic data alone would have picked the slow one.
FLAT_MAX = 100_000  # exact up to here: 2,400 q/s (batch) at 100k x 384, no build, exact
HNSW_MAX = 300_000  # HNSW builds took 20 s (100k) and 33 s (160k) x 384 on 2 cores


@dataclass(frozen=True)
class IndexChoice:
    """A FAISS factory string with the search parameters to start from, and why."""

    factory: str
    params: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    bytes_estimate: int = 0


def choose_index(n: int, d: int, memory_budget: int, flat_max: int = FLAT_MAX,
                 hnsw_max: int = HNSW_MAX) -> IndexChoice:
    """Pick an index for ``n`` vectors of dimension ``d`` within ``memory_budget`` bytes.

    Flat (exact) while ``n <= flat_max`` and the raw vectors fit; HNSW32 up to
    ``hnsw_max`` vectors when its graph fits too (on real embeddings it answered 4x
    faster than Flat and 14x faster than IVF at the same recall); else IVF with
    ``~sqrt(n)`` lists, storing full vectors, 8-bit scalars, or PQ codes, the first that
    fits the budget (at 1M x 512 synthetic, IVF1024 built 13x faster than HNSW32 and
    answered 28x more queries/s).  The stage then tunes nprobe/efSearch to the target
    recall on the column's own vectors, so the recall holds whatever the data.
    """
    if n < 1 or d < 1:
        raise ValueError(f"cannot index {n} vectors of dimension {d}")
    raw = n * d * 4
    if n <= flat_max and raw <= memory_budget:
        return IndexChoice("Flat", {}, f"{n} <= {flat_max} vectors: exact search", raw)
    hnsw = raw + n * 32 * 2 * 4  # M=32 links per vector at level 0, 4-byte ids
    if n <= hnsw_max and hnsw <= memory_budget:
        return IndexChoice("HNSW32", {"efSearch": 64},
                           f"{n} <= {hnsw_max} vectors, graph fits in memory", hnsw)
    nlist = ivf_lists(n)
    overhead = n * 8 + nlist * d * 4  # ids + centroids
    for storage, per_vector in (("Flat", d * 4), ("SQ8", d)):
        total = n * per_vector + overhead
        if total <= memory_budget:
            return IndexChoice(f"IVF{nlist},{storage}", {"nprobe": min(16, nlist)},
                               f"{n} vectors: inverted file, {storage} codes fit the budget",
                               total)
    # Plain PQ, not OPQ: OPQ training took minutes on 2 cores even for small sets (force
    # it with --factory "OPQ{m},IVF{nlist},PQ{m}" where the cores are there).
    m = _pq_bytes(d, (memory_budget - overhead) // n)
    if m == 0:
        raise InputError(
            f"memory budget {memory_budget / 2**30:.3g} GiB is too small for {n} vectors of "
            f"dimension {d} (even 4-byte PQ codes need {(n * 4 + overhead) / 2**30:.3g} GiB)")
    return IndexChoice(f"IVF{nlist},PQ{m}", {"nprobe": min(32, nlist)},
                       f"{n} vectors: full vectors exceed the budget, {m}-byte PQ codes",
                       n * m + overhead)


def ivf_lists(n: int) -> int:
    """About sqrt(n) inverted lists, a power of two, so each list holds ~sqrt(n) vectors."""
    return max(16, 2 ** round(math.log2(math.sqrt(n))))


def _pq_bytes(d: int, budget_per_vector: int) -> int:
    """The largest PQ code size (bytes) that divides ``d`` and fits, 0 if none does."""
    best = 0
    for m in (4, 8, 16, 32, 48, 64, 96, 128, 192, 256):
        if m <= budget_per_vector and d % m == 0 and m <= d // 2:
            best = m
    return best
