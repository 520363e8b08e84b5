"""Recall against exact search, and search parameters tuned to a target recall.

The ground truth is a seeded sample of the column's own rows with their exact top
``k + TIE_EXTRA`` neighbours, built by streaming brute force (:class:`Truth`, one chunk at
a time, so the column never has to fit in memory).  It is saved beside the index, so an
incremental add updates it with the new rows only and re-measures without reading the
old shards.  Half the queries tune ``nprobe``/``efSearch``, the other half measure.

Tie rule (the same as eval-retrieval's: a tie at rank k counts as a hit): a found id
whose exact score is at least the k-th exact score (within ``TIE_EPS``) is a true
neighbour even if the exact search listed an equally scored other row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

from .core import as_f32, ivf_of, release_pages, search_params, set_search_params
from .query import exact_knn, exact_scores, merge_topk, search

TIE_EPS = 1e-6  # cosine scores closer than this are a tie (float32 rounding)
TIE_EXTRA = 10  # exact neighbours kept past k: the exact scores of near misses
RELEASE_BATCH = 64  # on-disk lists: queries searched between two releases of the pages


@dataclass
class Truth:
    """Query rows (a seeded sample), their vectors and exact top-``depth`` neighbours."""

    rows: np.ndarray
    queries: np.ndarray
    scores: np.ndarray
    ids: np.ndarray
    k: int

    @classmethod
    def start(cls, n: int, n_queries: int, k: int, seed: int = 0) -> Truth:
        """An empty truth for ``2 * n_queries`` rows of ``n`` (tuning half, measuring half)."""
        k = min(k, n)
        rows = np.random.default_rng(seed + 1).choice(n, min(n, 2 * n_queries), replace=False)
        depth = min(n, k + TIE_EXTRA)
        return cls(rows.astype(np.int64), np.zeros((0, 0), np.float32),
                   np.full((len(rows), depth), -np.inf, np.float32),
                   np.full((len(rows), depth), -1, np.int64), k)

    def take_queries(self, start: int, vectors: np.ndarray) -> None:
        """Pick the query vectors out of a chunk of rows ``start, start + 1, ...``."""
        if self.queries.shape[1] != vectors.shape[1]:
            self.queries = np.zeros((len(self.rows), vectors.shape[1]), np.float32)
        inside = (self.rows >= start) & (self.rows < start + len(vectors))
        self.queries[inside] = vectors[self.rows[inside] - start]

    def update(self, start: int, vectors: np.ndarray) -> None:
        """Merge the exact neighbours among rows ``start, start + 1, ...``."""
        if not len(self.rows) or not len(vectors):
            return
        scores, ids = exact_knn(vectors, self.queries, min(self.depth, len(vectors)))
        ids = np.where(ids >= 0, ids + start, -1)
        self.scores, self.ids = merge_topk([self.scores, scores], [self.ids, ids], self.depth)

    @property
    def depth(self) -> int:
        return self.ids.shape[1]

    def half(self, which: int) -> Truth:
        """The tuning (0) or measuring (1) half (all of it when there is one query)."""
        if len(self.rows) < 2:
            return self
        h = len(self.rows) // 2
        part = slice(0, h) if which == 0 else slice(h, None)
        return Truth(self.rows[part], self.queries[part], self.scores[part], self.ids[part],
                     self.k)

    def recall(self, found: np.ndarray) -> float:
        """k-recall@k of ``found`` ids (one row per query), ties counted as hits."""
        hits = total = 0
        for f, t_ids, t_scores in zip(found, self.ids, self.scores):
            valid = t_ids >= 0
            top = t_ids[:self.k][valid[:self.k]]
            if not len(top):
                continue
            kth = t_scores[:self.k][valid[:self.k]][-1]
            known = dict(zip(t_ids[valid].tolist(), t_scores[valid].tolist()))
            f = [int(x) for x in f[:self.k] if x >= 0]
            ok = set(f) & set(top.tolist())
            ok |= {x for x in f if known.get(x, -np.inf) >= kth - TIE_EPS}
            hits += min(len(ok), len(top))
            total += len(top)
        return hits / total if total else float("nan")

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"rows": self.rows, "queries": self.queries, "scores": self.scores,
                "ids": self.ids, "k": np.array([self.k])}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> Truth:
        return cls(a["rows"], a["queries"], a["scores"], a["ids"], int(a["k"][0]))


def truth_in_memory(vectors: np.ndarray, n_queries: int, k: int, seed: int = 0) -> Truth:
    """The :class:`Truth` of an array already in memory (small runs, tests)."""
    t = Truth.start(len(vectors), n_queries, k, seed)
    t.queries = as_f32(vectors[t.rows])
    t.update(0, vectors)
    return t


def bounded_search(index: faiss.Index, queries: np.ndarray, k: int,
                   max_mapped: int | None = None) -> np.ndarray:
    """Ids of a search of on-disk lists that maps at most about ``max_mapped`` bytes of
    them at once: queries go in batches, and the pages are released between batches (so
    tuning does not grow the process by the whole lists file)."""
    batch = len(queries) if max_mapped is None else max(
        1, int(max_mapped // max(1, _probed_bytes(index))))
    out = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), batch):
        out[s:s + batch] = search(index, queries[s:s + batch], k)[1]
        release_pages(index)
    return out


def _probed_bytes(index: faiss.Index) -> int:
    """Bytes of on-disk lists one query maps at the current ``nprobe`` (0 in memory)."""
    ivf = ivf_of(index)
    if ivf is None:
        return 0
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        return 0
    return int(lists.totsize / max(1, ivf.nlist) * ivf.nprobe)


def tune_to(index: faiss.Index, truth: Truth, target: float,
            max_mapped: int | None = None) -> dict[str, int]:
    """Smallest ``nprobe``/``efSearch`` reaching ``target`` recall on ``truth`` (falls back
    to the largest value tried); left set on ``index`` and returned.  On-disk lists: only
    values whose one query maps under ``max_mapped`` bytes are tried."""
    name, values = _values(index)
    if not name:
        return {}
    chosen = values[0]
    for v in values:
        set_search_params(index, {name: v})
        if v > values[0] and max_mapped is not None and _probed_bytes(index) > max_mapped:
            set_search_params(index, {name: chosen})
            break
        chosen = v
        if truth.recall(bounded_search(index, truth.queries, truth.k, max_mapped)) >= target:
            break
    return {name: chosen}


def _values(index: faiss.Index) -> tuple[str, list[int]]:
    """The tunable parameter of ``index`` and the values to try, cheapest first."""
    params = search_params(index)
    if not params:
        return "", []
    (name,) = params
    if name == "nprobe":
        nlist = ivf_of(index).nlist
        return name, sorted({min(2**i, nlist) for i in range(int(math.log2(nlist)) + 2)})
    return name, [16, 32, 64, 128, 256, 512]


def evaluate(index: faiss.Index, truth: Truth, target: float = 0.95, tune_params: bool = True,
             max_mapped: int | None = None) -> tuple[dict[str, int], float, int]:
    """(search params, recall@k on the measuring half, its number of queries)."""
    if tune_params:
        tune_to(index, truth.half(0), target, max_mapped)
    held = truth.half(1)
    recall = held.recall(bounded_search(index, held.queries, truth.k, max_mapped))
    return search_params(index), recall, len(held.rows)


# ----------------------------------------------------------- array API (small inputs)

def recall_at_k(found: np.ndarray, truth: np.ndarray, found_scores: np.ndarray | None = None,
                kth_scores: np.ndarray | None = None) -> float:
    """Mean fraction of each query's exact top-k that ``found`` contains (k-recall@k);
    with the exact scores of the found ids and each query's k-th score, ties count."""
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


def tune(index: faiss.Index, tune_queries: np.ndarray, truth: np.ndarray, k: int,
         target: float, vectors: np.ndarray | None = None,
         truth_scores: np.ndarray | None = None) -> dict[str, int]:
    """Smallest ``nprobe``/``efSearch`` reaching ``target`` recall@k against ``truth``
    (exact top-k ids; with ``vectors`` and ``truth_scores``, ties count)."""
    name, values = _values(index)
    if not name:
        return {}
    for v in values:
        set_search_params(index, {name: v})
        _, ids = search(index, tune_queries, k)
        got = (recall_at_k(ids, truth) if vectors is None or truth_scores is None else
               tie_recall(ids, truth_scores, truth, vectors, tune_queries))
        if got >= target:
            break
    return {name: v}
