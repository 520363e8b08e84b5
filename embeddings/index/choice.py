"""Which index, built how, for n vectors of dimension d under a memory budget (policy only).

The choice follows autofaiss: exact search while it is small enough, a graph (HNSW) in
the middle tier, else an inverted file (IVF).  The budget bounds the *whole build*: the
training sample, the chunk being added, the codes held before they are written, and the
buffers of Parquet and FAISS (not the ~0.3 GB the Python process and its libraries take
before the build starts).  An IVF index whose lists do not fit beside those is written as
on-disk inverted lists and memory-mapped for search, so the index itself can exceed RAM.
No FAISS here: this module decides, :mod:`.builders` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import InputError

# Tiers measured on real MiniLM embeddings (dictionary words, Debian package descriptions)
# and on a clustered synthetic mixture (benchmarks/bench_search.py --tiers; README).  On
# real embeddings IVF with ~sqrt(n) lists needed nprobe = half its lists for recall@10
# 0.95 and was slower than Flat (160k words: IVF512 419 q/s, Flat 1,566, HNSW32 5,960 at
# 0.974); HNSW32 was 2.5-4x Flat.  On the synthetic mixture IVF won (200k: 3,423 q/s vs
# 850 for HNSW), so tiers chosen on synthetic data alone would have picked the slow one.
FLAT_MAX = 100_000  # exact up to here: 2,400 q/s (batch) at 100k x 384, no build, exact
HNSW_MAX = 300_000  # HNSW builds took 20 s (100k) and 33 s (160k) x 384 on 2 cores

TRAIN_PER_LIST = 64  # k-means points per list: FAISS warns below 39, subsamples above 256
MIN_PER_LIST = 39
PQ_TRAIN = 256 * 39  # PQ codebooks (256 centroids each) want as many points
GROWTH = 1.5  # inverted lists grow by doubling: held codes take up to ~1.5x their size
RESERVE = 64 * 2**20  # small allocations of a build (ids, heaps, quantizer scratch),
# at most an eighth of the budget
CHUNK_MAX = 65_536  # rows read and added at a time
SAMPLE_COPIES = 3  # the sample, its residuals for the codec, k-means scratch
READER_GROUPS = 4  # row groups of a column a Parquet reader holds while streaming
MEMORY_BUILD_SHARE = 0.5  # whole column in RAM only while it takes under half the budget


@dataclass(frozen=True)
class IndexChoice:
    """A FAISS factory string with the search parameters to start from, and why."""

    factory: str
    params: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    bytes_estimate: int = 0
    on_disk: bool = False  # inverted lists written to a file beside the index, mmapped


@dataclass(frozen=True)
class BuildPlan:
    """How a build stays inside its budget: which builder, how big each piece may be."""

    factory: str
    builder: str  # a key of the builders registry: memory | out_of_core | ray
    on_disk: bool
    train_size: int
    chunk_rows: int
    part_bytes: int  # codes held in memory (per worker) before they go to a part file
    budget: int
    estimate: dict[str, int] = field(default_factory=dict)  # bytes of each piece

    @property
    def peak(self) -> int:
        """Bytes held at once: training comes first and its sample is freed before the
        adds start, so the two phases do not add up."""
        e = self.estimate
        return e["reserve"] + e["chunk"] + max(e["train"], e["held"])


def chunk_rows(d: int, budget: int) -> int:
    """Rows per chunk: a chunk (float16 read + float32 copy + decode buffers, 8 bytes a
    dimension) takes at most an eighth of the budget, between 1,024 and 65,536 rows."""
    return int(min(CHUNK_MAX, max(1024, budget // 8 // (d * 8))))


def chunk_bytes(d: int, budget: int) -> int:
    """A chunk and the Parquet reader under it (about 4 row groups of the column, 16,384
    rows each as the store writes them; older shards with larger groups take more)."""
    return chunk_rows(d, budget) * d * 8 + READER_GROUPS * 16_384 * d * 2


def reserve(budget: int) -> int:
    return min(RESERVE, budget // 8)


def usable(budget: int, d: int) -> int:
    """What a build may hold besides its reserve and the chunk being added."""
    return budget - reserve(budget) - chunk_bytes(d, budget)


def choose_index(n: int, d: int, memory_budget: int, flat_max: int = FLAT_MAX,
                 hnsw_max: int = HNSW_MAX) -> IndexChoice:
    """Pick an index for ``n`` vectors of dimension ``d`` within ``memory_budget`` bytes.

    Flat (exact) while ``n <= flat_max`` and the raw vectors fit; HNSW32 up to
    ``hnsw_max`` vectors when its graph fits too (on real embeddings it answered 4x
    faster than Flat and 14x faster than IVF at the same recall); else IVF with
    ``~sqrt(n)`` lists storing full vectors, or 8-bit scalars, the first whose lists fit
    in memory beside the build's buffers; past that, 8-bit lists on disk (1 byte a
    dimension, recall within a point of full vectors, 4x less to read per query than
    on-disk full vectors).  PQ is never chosen: it lost 10-40 points of recall@10 on our
    data; force it with ``--factory IVF4096,PQ64`` to trade recall for a smaller file.
    The stage then tunes nprobe/efSearch to the target recall on the column's own vectors.
    """
    if n < 1 or d < 1:
        raise ValueError(f"cannot index {n} vectors of dimension {d}")
    avail = usable(memory_budget, d)
    raw = n * d * 4
    if n <= flat_max and raw <= avail:
        return IndexChoice("Flat", {}, f"{n} <= {flat_max} vectors: exact search", raw)
    hnsw = raw + n * 32 * 2 * 4  # M=32 links per vector at level 0, 4-byte ids
    if n <= hnsw_max and hnsw <= avail:
        return IndexChoice("HNSW32", {"efSearch": 64},
                           f"{n} <= {hnsw_max} vectors, graph fits in memory", hnsw)
    nlist = ivf_lists(n)
    overhead = n * 8 + nlist * d * 4  # ids + centroids
    for storage, per_vector, nprobe in (("Flat", d * 4, 16), ("SQ8", d, 16)):
        total = n * per_vector + overhead
        if total * GROWTH <= avail:
            return IndexChoice(f"IVF{nlist},{storage}", {"nprobe": min(nprobe, nlist)},
                               f"{n} vectors: inverted file, {storage} codes fit the budget",
                               total)
    if nlist * d * 4 * 4 > avail:
        need = nlist * d * 4 * 4 + memory_budget - avail
        raise _too_small(memory_budget, f"{n} vectors of dimension {d} need at least "
                         f"{need / 2**20:.0f} MiB (the {nlist} centroids, one chunk of "
                         f"{chunk_rows(d, memory_budget)} vectors and working memory)")
    total = n * d + overhead
    return IndexChoice(f"IVF{nlist},SQ8", {"nprobe": min(16, nlist)},
                       f"{n} vectors: the lists exceed the budget in memory, 8-bit lists "
                       f"on disk ({total / 2**30:.2f} GiB), memory-mapped", total, True)


def ivf_lists(n: int) -> int:
    """About sqrt(n) inverted lists, a power of two, so each list holds ~sqrt(n) vectors."""
    return max(16, 2 ** round(math.log2(math.sqrt(n))))


def train_size(n: int, nlist: int, pq: bool) -> int:
    """Training points FAISS recommends for ``nlist`` lists (PQ codebooks want more)."""
    want = TRAIN_PER_LIST * nlist if nlist else 65_536
    return min(n, max(want, PQ_TRAIN if pq else 0))


def plan_build(factory: str, n: int, d: int, budget: int, index_bytes: int, nlist: int,
               code_size: int, on_disk: bool | None = None, engine: str = "local",
               workers: int = 1) -> BuildPlan:
    """Sizes for building ``factory`` (``index_bytes``: its estimated size) in ``budget``.

    ``on_disk`` None: decided here (IVF lists that do not fit beside the buffers).  Ray
    workers run at once, so each gets its share of the budget.  A budget too small for
    the smallest sound plan is one error naming it.
    """
    rows = chunk_rows(d, budget)
    chunk = chunk_bytes(d, budget)
    avail = budget - reserve(budget) - chunk
    pq = "PQ" in factory
    want = train_size(n, nlist, pq) if nlist or pq else 0
    fits_train = max(0, avail) // (d * 4 * SAMPLE_COPIES)
    least = min(n, max(MIN_PER_LIST * nlist, PQ_TRAIN if pq else 0))
    if want > fits_train:
        if fits_train < least:
            raise _too_small(budget, f"training {factory} needs {least} sample vectors "
                             f"({least * d * 4 * SAMPLE_COPIES / 2**20:.0f} MiB)")
        want = fits_train
    held = int(index_bytes * GROWTH) if nlist else index_bytes
    if on_disk is None:
        on_disk = bool(nlist) and held > avail
    if not nlist and held > avail:
        raise _too_small(budget, f"{factory} holds {held / 2**20:.0f} MiB in memory")
    per_row = (code_size + 8) * GROWTH
    part = int((avail // max(1, workers if engine == "ray" else 1)) // per_row * per_row)
    if nlist and part < rows * per_row:
        raise _too_small(budget, f"each worker must hold at least one chunk of {rows} "
                         f"codes ({rows * per_row / 2**20:.0f} MiB)")
    whole = n * d * 4 + held + want * d * 4
    if engine == "ray" and nlist:
        builder = "ray"
    elif whole <= MEMORY_BUILD_SHARE * avail and not on_disk:
        builder = "memory"
    else:
        builder = "out_of_core"
    estimate = {"chunk": chunk, "train": want * d * 4 * SAMPLE_COPIES,
                "held": min(held, part) if on_disk else held, "reserve": reserve(budget)}
    return BuildPlan(factory, builder, on_disk, want, rows, part, budget, estimate)


def _too_small(budget: int, why: str) -> InputError:
    return InputError(f"memory budget {budget / 2**30:.3g} GiB is too small: {why}; raise "
                      "[index] memory_budget_gb (--memory-budget)")
