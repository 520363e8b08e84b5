"""Hybrid retrieval: several sources' top-K lists over one gallery, fused by weights.

Each source (CLIP's image index for a text query, the caption index, an adapter into the
image space, ...) gives every query its top ``K`` gallery items with scores.  Scores of
different models are not on one scale (a tiny CLIP's cosines sit within 0.02 of each
other, MiniLM's spread over 0.5), so each list is **standardised per query**: ``z = (s -
mean) / std`` over that query's ``K`` fetched scores.  An item one source did not fetch
gets just under that source's lowest fetched ``z`` (``UNFETCHED`` less): its true score is
at most the lowest fetched, so this is an upper bound, and an item no source ranks high
cannot climb on one list alone.
The fused score is ``sum_s w_s z_s`` over the union of the lists; ``w`` lies on the
simplex (non-negative, summing to one), so ``w = (1, 0)`` is the first source's own
ranking (z is monotone in s) and a tuned ``w`` is never worse than the better source on
the queries it was tuned on.

Why z-scores and not reciprocal-rank fusion: ranks throw away how far ahead a source's
first hit is; a source sure of one item (a wide gap) should outvote one that is not.
``bench_hybrid.py`` measures both on real text.

Weights are tuned on validation queries for recall@k over a grid of the simplex
(:func:`tune`); ties go to the higher recall at smaller k, then the better mean rank,
then the grid's order, so tuning is reproducible.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TIE_EPS = 1e-6  # fused scores closer than this tie (a tie at rank k counts as a hit)
UNFETCHED = 1e-3  # an unfetched item's z: this far below the source's last fetched one


@dataclass(frozen=True)
class Ranked:
    """One source's candidates: per query, gallery positions and scores, best first;
    missing slots have id -1 (score -inf)."""

    ids: np.ndarray  # (queries, K) int64
    scores: np.ndarray  # (queries, K) float32

    def __post_init__(self) -> None:
        if self.ids.shape != self.scores.shape or self.ids.ndim != 2:
            raise ValueError(f"ids {self.ids.shape} and scores {self.scores.shape} must be "
                             "two matching (queries, K) arrays")


def standardise(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-row z-scores over the valid entries; invalid ones get the row's lowest z (a
    row with no spread gets 0 everywhere)."""
    s = np.where(valid, scores, 0.0).astype(np.float64)
    n = np.maximum(valid.sum(axis=1, keepdims=True), 1)
    mean = s.sum(axis=1, keepdims=True) / n
    var = (np.where(valid, (s - mean) ** 2, 0.0)).sum(axis=1, keepdims=True) / n
    z = (s - mean) / np.maximum(np.sqrt(var), 1e-9)
    low = np.where(valid, z, np.inf).min(axis=1, keepdims=True)
    low = np.where(np.isfinite(low), low, 0.0)
    return np.where(valid, z, low)


@dataclass(frozen=True)
class Union:
    """The union of the sources' candidates per query and each source's z there."""

    ids: np.ndarray  # (queries, U) gallery positions, -1 padded
    z: np.ndarray  # (queries, U, sources)

    def fused(self, weights: Sequence[float]) -> np.ndarray:
        """Fused scores (queries, U); padding is -inf."""
        out = self.z @ np.asarray(weights, np.float64)
        return np.where(self.ids >= 0, out, -np.inf)


def union(lists: Sequence[Ranked]) -> Union:
    """Every query's candidates from all ``lists`` (same queries, same gallery)."""
    if not lists:
        raise ValueError("hybrid retrieval needs at least one source")
    nq = len(lists[0].ids)
    if any(len(r.ids) != nq for r in lists):
        raise ValueError("every source must rank the same queries")
    zs = [standardise(r.scores, r.ids >= 0) for r in lists]
    width = sum(r.ids.shape[1] for r in lists)
    ids = np.full((nq, width), -1, np.int64)
    z = np.zeros((nq, width, len(lists)))
    for q in range(nq):
        cand = np.unique(np.concatenate([r.ids[q][r.ids[q] >= 0] for r in lists]))
        ids[q, :len(cand)] = cand
        for s, (r, zr) in enumerate(zip(lists, zs)):
            ok = r.ids[q] >= 0
            low = (zr[q][ok].min() if ok.any() else 0.0) - UNFETCHED
            col = np.full(len(cand), low)
            pos = np.searchsorted(cand, r.ids[q][ok])
            col[pos] = zr[q][ok]
            z[q, :len(cand), s] = col
    used = int((ids >= 0).sum(axis=1).max()) if nq else 0
    return Union(ids[:, :used], z[:, :used])


def fuse(lists: Sequence[Ranked], weights: Sequence[float], k: int) -> Ranked:
    """The fused top ``k`` per query (ties: the smaller gallery position first)."""
    u = union(lists)
    f = u.fused(weights)
    order = np.lexsort((np.where(u.ids >= 0, u.ids, np.iinfo(np.int64).max), -f), axis=1)
    order = order[:, :k]
    ids = np.take_along_axis(u.ids, order, axis=1)
    scores = np.take_along_axis(f, order, axis=1).astype(np.float32)
    pad = k - ids.shape[1]
    if pad > 0:
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return Ranked(ids, np.where(ids >= 0, scores, -np.inf).astype(np.float32))


def ranks(u: Union, weights: Sequence[float], right: np.ndarray) -> np.ndarray:
    """Rank of each query's right gallery position under the fused scores (ties count as
    hits); a right item no source fetched gets rank ``U`` (a miss at any k it could
    reach)."""
    f = u.fused(weights)
    at = u.ids == np.asarray(right)[:, None]
    found = at.any(axis=1)
    mine = np.where(found, np.where(at, f, -np.inf).max(axis=1), np.inf)
    r = (f > mine[:, None] + TIE_EPS).sum(axis=1)
    return np.where(found, r, max(u.ids.shape[1], 1) + 10 ** 6)


def grid(sources: int, step: float = 0.05) -> list[tuple[float, ...]]:
    """Points of the simplex with coordinates in multiples of ``step`` (the corners, i.e.
    each source alone, included)."""
    n = round(1 / step)
    if sources == 1:
        return [(1.0,)]
    out = [tuple(c / n for c in (*cuts, n - sum(cuts)))
           for cuts in itertools.product(range(n + 1), repeat=sources - 1) if sum(cuts) <= n]
    return sorted(out, reverse=True)


@dataclass(frozen=True)
class Tuned:
    weights: tuple[float, ...]
    recall: dict[str, float]  # of the chosen weights, on the tuning queries
    by_source: list[dict[str, float]]  # each source alone (its corner of the grid)


def recall_at(r: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    return {f"R@{k}": float(np.mean(r < k)) if len(r) else float("nan") for k in ks}


def tune(lists: Sequence[Ranked], right: np.ndarray, k: int = 10,
         ks: Sequence[int] = (1, 5, 10), step: float = 0.05) -> Tuned:
    """Weights maximising recall@``k`` of the fused lists on these queries (``right``: the
    one right gallery position per query)."""
    u = union(lists)
    points = grid(len(lists), step)
    small = sorted(x for x in ks if x < k)

    def key(r: np.ndarray) -> tuple[float, ...]:
        return (float(np.mean(r < k)), *(float(np.mean(r < x)) for x in reversed(small)),
                float(np.mean(1.0 / (1.0 + r))))

    scored = [(key(ranks(u, w, right)), -i, w) for i, w in enumerate(points)]
    best = max(scored)[2]
    corners = [tuple(float(i == s) for i in range(len(lists))) for s in range(len(lists))]
    return Tuned(best, recall_at(ranks(u, best, right), ks),
                 [recall_at(ranks(u, c, right), ks) for c in corners])


def rrf(lists: Sequence[Ranked], weights: Sequence[float], c: float = 60.0) -> Union:
    """Weighted reciprocal-rank fusion as a :class:`Union` (``sum_s w_s / (c + rank_s)``,
    0 where a source did not fetch the item): the alternative ``bench_hybrid`` compares."""
    u = union(lists)
    z = np.zeros_like(u.z)
    for s, r in enumerate(lists):
        for q in range(len(u.ids)):
            ok = r.ids[q] >= 0
            where = {int(i): j for j, i in enumerate(r.ids[q][ok])}
            z[q, :, s] = [1.0 / (c + 1 + where[int(i)]) if int(i) in where else 0.0
                          for i in u.ids[q]]
    return Union(u.ids, z)


__all__ = ["TIE_EPS", "Ranked", "Tuned", "Union", "fuse", "grid", "ranks", "recall_at", "rrf",
           "standardise", "tune", "union"]
