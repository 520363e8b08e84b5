"""Search: top-k, filtered top-k that is right first, exact k-NN, and neighbour batches.

Filtered search gives FAISS the allowed rows as a bitmap selector, so only allowed rows
are ever scored, and widens the search until every query has ``min(k, allowed)`` hits:

- IVF: ``nprobe`` is scaled by 1 / selectivity (a filtered query then looks at as many
  *allowed* candidates as an unfiltered one looks at candidates), and raised to all lists
  for queries still short; with every list probed each allowed row is scored, so the
  answer is complete.
- HNSW: ``efSearch`` scaled the same way; short queries, and filters keeping under 5% of
  the rows, are answered exactly over the graph's flat storage.
- Flat and other flat-code indexes: one exact pass with the selector.

Before any of that, IVF-Flat / SQ / PQ indexes answer a filter keeping few rows (see
:mod:`.rare`) by scoring exactly just those rows' codes, found in the lists once per
filter: a rare label never makes a query read every list.  A filter keeping many rows
there first probes, per query, the nearest lists that hold its rows (see :mod:`.dense`):
a split costs what an unfiltered query costs, a label made of a few clusters finds them;
only queries still short of hits go on to the widening.

GPU indexes take no selector: they oversample and filter, asking up to 2,048 neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from . import dense, rare
from .core import GPU_MAX_K, _hnsw, as_f32, is_gpu, ivf_of

SEARCH_BATCH = 4096
EXACT_SHARE = 0.05  # HNSW: filters keeping fewer rows than this go exact
EF_MAX = 4096


def search(index: faiss.Index, queries: np.ndarray, k: int,
           params: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) per query, in batches; ids are -1 where fewer exist."""
    q = as_f32(queries)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scores = np.empty((len(q), k), np.float32)
    ids = np.empty((len(q), k), np.int64)
    for start in range(0, len(q), SEARCH_BATCH):
        part = slice(start, start + SEARCH_BATCH)
        if params is None:
            scores[part], ids[part] = index.search(q[part], k)
        else:
            scores[part], ids[part] = index.search(q[part], k, params=params)
    return scores, ids


@dataclass(frozen=True)
class Allowed:
    """The rows a filter keeps as a packed bitmap (what FAISS's selector reads): cache
    this rather than a bool mask, 8x smaller and no packing per query."""

    bits: np.ndarray  # uint8, little-endian bit order
    n: int
    count: int
    # index id -> (index, where the rows sit): rare.Entries or dense per-list counts
    memo: dict[int, tuple[Any, Any]] = field(default_factory=dict, compare=False,
                                             repr=False)

    @classmethod
    def of(cls, mask: np.ndarray) -> Allowed:
        mask = np.asarray(mask, dtype=bool)
        return cls(np.packbits(mask, bitorder="little"), len(mask), int(mask.sum()))

    def mask(self) -> np.ndarray:
        return np.unpackbits(self.bits, count=self.n, bitorder="little").astype(bool)

    def placement(self, index: faiss.Index) -> Any:
        """Where these rows sit in ``index``'s inverted lists, found once per index (the
        memo holds the index too, so its id is not reused while the entry is kept):
        their (list, offset) entries when few (:mod:`.rare`), else how many each list
        holds (:mod:`.dense`); None where neither path applies."""
        got = self.memo.get(id(index))
        if got is None or got[0] is not index or \
                isinstance(got[1], rare.Entries) != rare.takes(index, self.count):
            ivf = rare.codec_ivf(index)
            if ivf is None or is_gpu(index):
                return None
            found = rare.entries(ivf, self.bits, self.n) if rare.takes(index, self.count) \
                else dense.place(ivf, self.bits, self.n)
            got = (index, found)
            self.memo.clear()
            self.memo[id(index)] = got
        return got[1]

    def packed_placement(self, index: faiss.Index) -> bytes | None:
        """:meth:`placement` as bytes to cache (None where no path uses it)."""
        found = self.placement(index)
        if found is None:
            return None
        if isinstance(found, rare.Entries):
            return rare.pack(found, rare.codec_ivf(index))
        return dense.pack(found)

    def use_placement(self, index: faiss.Index, data: bytes) -> bool:
        """Take a placement cached as :meth:`packed_placement` wrote it (False: unusable)."""
        ivf = rare.codec_ivf(index)
        if ivf is None or is_gpu(index):
            return False
        if rare.takes(index, self.count):
            found = rare.unpack(data, self.count, self.n,
                                int(ivf.code_size + ivf.coarse_code_size()))
            if found is None or not rare.fits(found, ivf):
                return False
        else:
            found = dense.unpack(data, ivf, self.count)
            if found is None:
                return False
        self.memo.clear()
        self.memo[id(index)] = (index, found)
        return True


def search_filtered(index: faiss.Index, queries: np.ndarray, k: int,
                    allowed: np.ndarray | Allowed | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` among the rows where ``allowed`` (bool per index row, or an
    :class:`Allowed`) is true; ``min(k, allowed rows)`` hits for every query.  Missing
    slots: id -1, score -inf."""
    if allowed is None:
        return search(index, queries, k)
    rows = allowed if isinstance(allowed, Allowed) else Allowed.of(allowed)
    if rows.n != index.ntotal:
        raise ValueError(f"the filter has {rows.n} rows, the index {index.ntotal}")
    q = as_f32(queries)
    out_s = np.full((len(q), k), -np.inf, np.float32)
    out_i = np.full((len(q), k), -1, np.int64)
    if rows.count == 0 or len(q) == 0:
        return out_s, out_i
    if is_gpu(index):
        return _oversample(index, q, k, rows.mask(), rows.count, out_s, out_i)
    found = rows.placement(index)
    if isinstance(found, rare.Entries):
        out_s, out_i = rare.search_entries(index, q, k, found)
        out_s[out_i < 0] = -np.inf
        return out_s, out_i
    sel = faiss.IDSelectorBitmap(rows.n, faiss.swig_ptr(rows.bits))  # points into bits
    want = min(k, rows.count)
    todo = np.arange(len(q))
    if found is not None:  # many rows: the lists holding them, nearest first
        for start in range(0, len(q), SEARCH_BATCH):
            part = slice(start, start + SEARCH_BATCH)
            out_s[part], out_i[part] = dense.search(index, rare.codec_ivf(index), q[part], k,
                                                    found, sel)
        todo = todo[(out_i >= 0).sum(1) < want]
    for params in _widening(index, sel, k, rows.count / index.ntotal):
        if not len(todo):
            break
        if isinstance(params, _Exact):
            scores, ids = params.search(q[todo], k)
        else:
            scores, ids = search(index, q[todo], k, params)
        out_s[todo], out_i[todo] = scores, ids
        todo = todo[(ids >= 0).sum(1) < want]
    out_s[out_i < 0] = -np.inf
    return out_s, out_i


def _widening(index: faiss.Index, sel: Any, k: int, share: float) -> Iterator[Any]:
    """Search parameters from the cheapest likely to suffice to one that is complete."""
    ivf = ivf_of(index)
    if ivf is not None:
        nlist = int(ivf.nlist)
        nprobe = min(nlist, max(int(ivf.nprobe), math.ceil(ivf.nprobe / share)))
        while True:
            yield _wrap(index, faiss.SearchParametersIVF(sel=sel, nprobe=nprobe))
            if nprobe >= nlist:
                return
            nprobe = min(nlist, nprobe * 4)
    hnsw = _hnsw(index)
    if hnsw is not None:
        if share >= EXACT_SHARE:
            ef = min(EF_MAX, max(int(hnsw.hnsw.efSearch), math.ceil(k / share), k))
            yield _wrap(index, faiss.SearchParametersHNSW(sel=sel, efSearch=ef))
        yield _Exact(faiss.downcast_index(hnsw.storage), sel, index)
        return
    yield _wrap(index, faiss.SearchParameters(sel=sel))


class _Exact:
    """Marker: search the graph's flat storage (exact) instead of the graph."""

    def __init__(self, storage: faiss.Index, sel: Any, index: faiss.Index) -> None:
        self.storage, self.sel, self.index = storage, sel, index

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(self.index, faiss.IndexPreTransform):
            q = self.index.apply_py(q)
        return search(self.storage, q, k, faiss.SearchParameters(sel=self.sel))


def _wrap(index: faiss.Index, params: Any) -> Any:
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.SearchParametersPreTransform(index_params=params)
    return params


def _oversample(index: faiss.Index, q: np.ndarray, k: int, allowed: np.ndarray,
                n_allowed: int, out_s: np.ndarray, out_i: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """GPU indexes: ask for more neighbours until ``k`` allowed ones come back (at most
    ``GPU_MAX_K``: a very rare filter can come back short there)."""
    most = min(index.ntotal, GPU_MAX_K)
    ask = min(most, max(2 * k, math.ceil(k * index.ntotal / n_allowed * 2)))
    todo = np.arange(len(q))
    while len(todo):
        scores, ids = search(index, q[todo], ask)
        ok = (ids >= 0) & allowed[np.maximum(ids, 0)]
        short = []
        for qi, s, i, m in zip(todo, scores, ids, ok):
            got = min(k, int(m.sum()))
            out_s[qi, :got], out_i[qi, :got] = s[m][:got], i[m][:got]
            if got < min(k, n_allowed) and ask < most:
                short.append(qi)
        todo = np.array(short, dtype=np.int64)
        ask = min(most, ask * 4)
    return out_s, out_i


# ----------------------------------------------------------------------------- exact

def exact_knn(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, ids) by inner product."""
    return faiss.knn(as_f32(queries), as_f32(vectors), min(k, len(vectors)),
                     metric=faiss.METRIC_INNER_PRODUCT)


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-``k`` ids by inner product (FAISS brute force, no index kept)."""
    return exact_knn(vectors, queries, k)[1]


def exact_scores(vectors: np.ndarray, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact inner products of each query with its ``ids`` (-inf where an id is -1)."""
    q = as_f32(queries)
    out = np.einsum("qd,qkd->qk", q, as_f32(vectors)[np.maximum(ids, 0)].reshape(
        *ids.shape, q.shape[1]))
    return np.where(ids >= 0, out, -np.inf).astype(np.float32)


def merge_topk(scores: list[np.ndarray], ids: list[np.ndarray],
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of several top-k lists per query; equal scores: the lower id first
    (the order of an exact search over rows in order)."""
    s = np.concatenate(scores, axis=1)
    i = np.concatenate(ids, axis=1)
    s = np.where(i >= 0, s, -np.inf)
    order = np.lexsort((np.where(i >= 0, i, np.iinfo(np.int64).max), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


# ------------------------------------------------------------------ neighbour batches

def neighbours(index: faiss.Index, chunks: Iterable[tuple[int, np.ndarray]], k: int
               ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(start, scores, ids) of the ``k`` nearest indexed vectors of each chunk's vectors,
    chunk by chunk: the k-NN graph of a whole column in bounded memory (feed it the
    column's own chunks; each vector finds itself first)."""
    for start, vectors in chunks:
        scores, ids = search(index, vectors, k)
        yield start, scores, ids


def assignments(index: faiss.Index, chunks: Iterable[tuple[int, np.ndarray]], lists: int = 1
                ) -> Iterator[tuple[int, np.ndarray]]:
    """(start, list number) of each chunk's vectors in an IVF index (its coarse cell);
    with ``lists > 1`` an ``(n, lists)`` array of the nearest cells, nearest first."""
    ivf = ivf_of(index)
    if ivf is None:
        raise ValueError("only an IVF index has lists")
    for start, vectors in chunks:
        x = as_f32(vectors)
        if isinstance(index, faiss.IndexPreTransform):
            x = index.apply_py(x)
        _, got = ivf.quantizer.search(x, min(lists, ivf.nlist))
        yield start, got[:, 0] if lists == 1 else got
