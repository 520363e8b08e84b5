"""FAISS indexes over L2-normalised vectors: build, tune, search, measure, save, load.

Arrays in, arrays out; no knowledge of run directories (that is ``pipeline.index``).
Vectors are unit length, so inner product is cosine similarity and every index uses
``METRIC_INNER_PRODUCT``.  Which index to build is policy, in :mod:`.index_choice`; search
parameters (``nprobe``, ``efSearch``) are tuned on held-out
queries to a target recall and recorded, so a reloaded index answers the same way.

A GPU build of FAISS is used when one is installed and a GPU is present; indexes are
always stored in their CPU form, so a file written on a GPU machine opens anywhere.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .errors import InputError
from .index_choice import FLAT_MAX, HNSW_MAX, IndexChoice, choose_index, ivf_lists
from .store.files import atomic_path

# The choice is re-exported: callers ask one module for indexes (ix.choose_index(...)).
__all__ = ["FLAT_MAX", "HNSW_MAX", "IndexChoice", "choose_index", "ivf_lists"]

TRAIN_PER_LIST = 64  # k-means points per inverted list (FAISS wants at least 39)
SEARCH_BATCH = 4096
GPU_MAX_K = 2048  # FAISS GPU indexes answer at most this many neighbours per query

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ build

def use_gpu(device: str = "auto") -> bool:
    """Whether to put indexes on a GPU: ``auto`` when FAISS has GPU support and a GPU."""
    if device == "cpu":
        return False
    has = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if device.startswith("cuda") and not has:
        raise InputError(f"device {device!r} asked for, but FAISS sees no GPU "
                         "(faiss-cpu installed, or no CUDA device)")
    return has


_GPU_RESOURCES: Any = None


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A GPU copy of ``index`` (float16 storage off: results match the CPU index)."""
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    opts = faiss.GpuClonerOptions()
    opts.useFloat16 = False
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index, opts)


def gpu_supported(factory: str) -> bool:
    """FAISS GPU implements flat, IVF-Flat/SQ/PQ; HNSW and OPQ pre-transforms stay on CPU."""
    return "HNSW" not in factory and "OPQ" not in factory


def build_index(vectors: np.ndarray, factory: str, train_size: int | None = None,
                seed: int = 0, gpu: bool = False) -> faiss.Index:
    """Train (on a seeded sample) and fill an inner-product index; returns a CPU index."""
    x = _as_f32(vectors)
    n, d = x.shape
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        codec = faiss.downcast_index(ivf) if ivf is not None else index
        if hasattr(codec, "do_polysemous_training"):
            # Only polysemous (Hamming) search needs it, and it costs most of PQ training.
            codec.do_polysemous_training = False
        want = train_size or (TRAIN_PER_LIST * ivf.nlist if ivf is not None else 65_536)
        want = max(want, 256 * 39 if "PQ" in factory else 0)
        sample = x if n <= want else x[np.sort(np.random.default_rng(seed).choice(n, want,
                                                                                 replace=False))]
        if ivf is not None:
            ivf.cp.seed = seed
            if ivf.nlist > len(sample):
                raise InputError(f"{factory}: {ivf.nlist} lists need at least as many "
                                 f"training vectors, got {len(sample)}")
        work = to_gpu(index) if gpu and gpu_supported(factory) else index
        work.train(sample)
        index = faiss.index_gpu_to_cpu(work) if work is not index else index
    return add_vectors(index, x, gpu=gpu, factory=factory)


def add_vectors(index: faiss.Index, vectors: np.ndarray, gpu: bool = False,
                factory: str = "") -> faiss.Index:
    """Append ``vectors`` (ids continue from ``index.ntotal``); returns a CPU index."""
    x = _as_f32(vectors)
    if x.shape[1] != index.d:
        raise ValueError(f"vectors have dimension {x.shape[1]}, the index {index.d}")
    if gpu and gpu_supported(factory):
        work = to_gpu(index)
        work.add(x)
        return faiss.index_gpu_to_cpu(work)
    index.add(x)
    return index


def _as_f32(x: np.ndarray) -> np.ndarray:
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


# ------------------------------------------------------------------ search parameters

def search_params(index: faiss.Index) -> dict[str, int]:
    """The tunable search parameters of ``index`` and their current values."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return {"nprobe": int(ivf.nprobe)}
    hnsw = _hnsw(index)
    if hnsw is not None:
        return {"efSearch": int(hnsw.hnsw.efSearch)}
    return {}


def set_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Apply recorded ``nprobe``/``efSearch`` (also to GPU and pre-transformed indexes)."""
    for name, value in params.items():
        if name == "nprobe":
            ivf = faiss.try_extract_index_ivf(index)
            if ivf is not None:
                ivf.nprobe = int(value)
            else:  # GPU IVF indexes are not IndexIVF subclasses
                faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(value))
        elif name == "efSearch":
            hnsw = _hnsw(index)
            if hnsw is not None:
                hnsw.hnsw.efSearch = int(value)
        else:
            raise ValueError(f"unknown search parameter {name!r}")


def _hnsw(index: faiss.Index) -> Any:
    base = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) \
        else index
    return base if isinstance(base, faiss.IndexHNSW) else None


def tune(index: faiss.Index, tune_queries: np.ndarray, truth: np.ndarray, k: int,
         target: float, vectors: np.ndarray | None = None,
         truth_scores: np.ndarray | None = None) -> dict[str, int]:
    """Smallest ``nprobe``/``efSearch`` reaching ``target`` recall@k on ``tune_queries``.

    ``truth`` holds the exact top-k ids (with ``vectors`` and ``truth_scores``: ties
    counted as in :func:`recall_at_k`).  Falls back to the largest value tried.  The
    chosen value is left set on ``index`` and returned.
    """
    params = search_params(index)
    if not params:
        return {}
    (name,) = params
    if name == "nprobe":
        nlist = faiss.try_extract_index_ivf(index).nlist
        values = sorted({min(2**i, nlist) for i in range(int(math.log2(nlist)) + 2)})
    else:
        values = [16, 32, 64, 128, 256, 512]
    for v in values:
        set_search_params(index, {name: v})
        _, ids = search(index, tune_queries, k)
        got = (recall_at_k(ids, truth) if vectors is None or truth_scores is None else
               tie_recall(ids, truth_scores, truth, vectors, tune_queries))
        if got >= target:
            break
    return {name: v}


# --------------------------------------------------------------------- search, recall

def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) per query, in batches; ids are -1 where fewer exist."""
    q = _as_f32(queries)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scores = np.empty((len(q), k), np.float32)
    ids = np.empty((len(q), k), np.int64)
    for start in range(0, len(q), SEARCH_BATCH):
        part = slice(start, start + SEARCH_BATCH)
        scores[part], ids[part] = index.search(q[part], k)
    return scores, ids


def search_filtered(index: faiss.Index, queries: np.ndarray, k: int,
                    allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` among the rows where ``allowed`` (bool, one per index row) is true.

    Oversamples and filters (works for every index type, CPU or GPU): asks for
    ``k * ntotal / allowed`` neighbours, doubling for queries still short, up to all.
    Missing slots are id -1, score -inf.
    """
    if allowed is None:
        return search(index, queries, k)
    n_allowed = int(allowed.sum())
    q = _as_f32(queries)
    out_s = np.full((len(q), k), -np.inf, np.float32)
    out_i = np.full((len(q), k), -1, np.int64)
    if n_allowed == 0 or index.ntotal == 0:
        return out_s, out_i
    todo = np.arange(len(q))
    most = min(index.ntotal, GPU_MAX_K if "Gpu" in type(index).__name__ else index.ntotal)
    ask = min(most, max(2 * k, math.ceil(k * index.ntotal / n_allowed * 2)))
    while len(todo):
        scores, ids = search(index, q[todo], ask)
        ok = (ids >= 0) & allowed[np.maximum(ids, 0)]
        short = []
        for row, (qi, s, i, m) in enumerate(zip(todo, scores, ids, ok)):
            got = min(k, int(m.sum()))
            out_s[qi, :got], out_i[qi, :got] = s[m][:got], i[m][:got]
            if got < min(k, n_allowed) and ask < most and (ids[row] >= 0).all():
                short.append(qi)
        todo = np.array(short, dtype=np.int64)
        ask = min(most, ask * 4)
    return out_s, out_i


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-``k`` ids by inner product (FAISS brute force, no index kept)."""
    return exact_knn(vectors, queries, k)[1]


def exact_knn(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, ids) by inner product."""
    return faiss.knn(_as_f32(queries), _as_f32(vectors), min(k, len(vectors)),
                     metric=faiss.METRIC_INNER_PRODUCT)


def exact_scores(vectors: np.ndarray, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact inner products of each query with its ``ids`` (-inf where an id is -1)."""
    q = _as_f32(queries)
    out = np.einsum("qd,qkd->qk", q, _as_f32(vectors)[np.maximum(ids, 0)].reshape(
        *ids.shape, q.shape[1]))
    return np.where(ids >= 0, out, -np.inf).astype(np.float32)


TIE_EPS = 1e-6  # cosine scores closer than this are a tie (float32 rounding)


def recall_at_k(found: np.ndarray, truth: np.ndarray, found_scores: np.ndarray | None = None,
                kth_scores: np.ndarray | None = None) -> float:
    """Mean fraction of each query's exact top-k that ``found`` contains (k-recall@k).

    Tie rule (the same as eval-retrieval's: a tie at rank k counts as a hit): given the
    exact scores of the found ids and each query's exact k-th score, a found id scoring
    at least the k-th score (within ``TIE_EPS``) is a true neighbour even if the exact
    search listed an equally scored other row.  Without scores: ids only.
    """
    if len(truth) == 0:
        return float("nan")
    hits = 0
    for q, (f, t) in enumerate(zip(found, truth)):
        t_set = set(t[t >= 0].tolist())
        ok = set(f[f >= 0].tolist()) & t_set
        if found_scores is not None and kth_scores is not None:
            ok |= {int(i) for i, s in zip(f, found_scores[q])
                   if i >= 0 and s >= kth_scores[q] - TIE_EPS}
        hits += min(len(ok), len(t_set))
    return hits / max(1, int((truth >= 0).sum()))


def tie_recall(index_ids: np.ndarray, truth_scores: np.ndarray, truth: np.ndarray,
               vectors: np.ndarray, queries: np.ndarray) -> float:
    """:func:`recall_at_k` with the tie rule, scoring the found ids exactly."""
    kth = truth_scores[np.arange(len(truth)), (truth >= 0).sum(1) - 1]
    return recall_at_k(index_ids, truth, exact_scores(vectors, queries, index_ids), kth)


@dataclass(frozen=True)
class Built:
    index: faiss.Index
    params: dict[str, int]
    recall: float
    queries: int
    seconds: float


def build_and_measure(vectors: np.ndarray, factory: str, k: int = 10,
                      target_recall: float = 0.95, n_queries: int = 500, seed: int = 0,
                      gpu: bool = False, params: dict[str, int] | None = None) -> Built:
    """Build, tune search parameters (unless ``params`` given), measure recall@k.

    Queries are a seeded sample of the vectors themselves, split into a tuning half and
    a measuring half so the reported recall is not the one the tuning saw.
    """
    t0 = time.perf_counter()
    index = build_index(vectors, factory, seed=seed, gpu=gpu)
    seconds = time.perf_counter() - t0
    if params:
        set_search_params(index, params)
    tuned, recall, nq = measure(index, vectors, k, target_recall, n_queries, seed,
                                tune_params=not params)
    return Built(index, params or tuned, recall, nq, seconds)


def measure(index: faiss.Index, vectors: np.ndarray, k: int = 10, target_recall: float = 0.95,
            n_queries: int = 500, seed: int = 0,
            tune_params: bool = True) -> tuple[dict[str, int], float, int]:
    """(search params, recall@k vs exact, number of measuring queries) for ``index``;
    ties at rank k count as hits (:func:`recall_at_k`)."""
    n = len(vectors)
    k = min(k, n)
    pick = np.random.default_rng(seed + 1).choice(n, min(n, 2 * n_queries), replace=False)
    queries = _as_f32(vectors[pick])
    scores, truth = exact_knn(vectors, queries, k)
    half = len(queries) // 2 if len(queries) > 1 else 1
    if tune_params:
        tune(index, queries[:half], truth[:half], k, target_recall, vectors, scores[:half])
    rest = slice(half, None) if len(queries) > 1 else slice(None)
    _, ids = search(index, queries[rest], k)
    recall = tie_recall(ids, scores[rest], truth[rest], vectors, queries[rest])
    return search_params(index), recall, len(queries[rest])


# ------------------------------------------------------------------------ save / load

def save_index(index: faiss.Index, path: Path) -> None:
    """Write ``index`` atomically (a uniquely named temporary file, then a rename)."""
    with atomic_path(Path(path)) as tmp:
        faiss.write_index(index, str(tmp))


def load_index(path: Path, mmap: bool = True, params: dict[str, int] | None = None,
               gpu: bool = False, factory: str = "") -> faiss.Index:
    """Open an index file, memory-mapped and read-only when ``mmap``.

    mmap makes opening cost no copy of the vectors (flat codes and inverted lists are
    paged in on first touch), so a large index opens at once.  A mapped index must never
    be added to: FAISS aborts the process.  HNSW graphs are always read into memory.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"index file {path} is missing")
    flags = 0
    if mmap:
        # The two flags cannot be combined: IVF lists map through IO_FLAG_MMAP, flat codes
        # (Flat, the storage of HNSW) through IO_FLAG_MMAP_IFC.
        flags = (faiss.IO_FLAG_MMAP if "IVF" in factory else faiss.IO_FLAG_MMAP_IFC) \
            | faiss.IO_FLAG_READ_ONLY
    index = faiss.read_index(str(path), flags)
    if gpu and gpu_supported(factory):
        index = to_gpu(index)
    if params:
        set_search_params(index, params)
    return index


def index_bytes(index: faiss.Index) -> int:
    """Size of the index in its serialised form (what it holds in memory, about)."""
    return int(faiss.serialize_index(index).nbytes)


def check_factory(factory: str, d: int) -> str:
    """``factory`` if FAISS can build an index of dimension ``d`` from it, else InputError."""
    try:
        faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise InputError(f"FAISS cannot build {factory!r} for dimension {d}: {first}") from None
    return factory

