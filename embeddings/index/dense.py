"""Filtered search over many rows: probe the lists that hold them, not nprobe / share.

Scaling ``nprobe`` by 1 / selectivity is right for neither kind of filter a user sets:

- a *spread* filter (a split: 15% of every list) keeps the neighbourhood of the query as it
  is, so the tuned ``nprobe`` already finds the filtered neighbours; probing 1 / 0.15 = 7x
  more lists (107 of 4,096 at 20M rows) costs 30 ms a query for no recall (0.9735 vs 0.9725);
- a *clustered* filter (a label that is a few clusters: 1.2% of the rows in 52 lists) puts
  the allowed rows far from most queries: ``nprobe`` / share = 1,366 lists finds the wrong
  ones (recall@10 0.68 at 20M) after scanning a third of the index.

So the filter's rows are first counted per inverted list (one pass over the lists' ids,
kept with the filter and cached beside the index, a few KB).  Each query then walks the
lists in centroid order, skips those holding no allowed row, and stops once it has probed
``need`` lists' worth of allowed rows: a list counts min(1, its allowed share / the
filter's share), and ``need`` = nprobe / sqrt(the lists' share the filter covers), at most
every list that holds an allowed row.  A spread filter then probes about ``nprobe`` lists;
a clustered one probes all of its few lists (or more of its many), and never scans lists
holding none.  The work is bounded: ``need`` is at most about nprobe^(2/3) nlist^(1/3)
lists (102 of 4,096 at nprobe 16).  A query that still has fewer than ``k`` hits goes on
to the caller's widening (every list in the end: complete).

Only plain IVF-Flat / SQ / PQ (maybe behind a pre-transform) take this path: it calls the
IVF's ``search_preassigned`` with the chosen lists.  The coarse quantizer ranks up to
``4 * need * nlist / holding`` lists per query (every list for a filter living in few),
a few queries at a time so that table stays under ``DEPTH_CELLS``; a graph (HNSW)
quantizer ranks at most ``GRAPH_DEPTH``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from .core import as_f32, list_sizes
from .rare import ids_by_list, kept

STATS = {"count_scans": 0, "searches": 0, "lists_probed": 0}
GRAPH_DEPTH = 1024  # lists ranked per query by a graph (HNSW) coarse quantizer, at most
DEPTH_CELLS = 2**22  # (query, list) pairs ranked at a time: 48 MB of ids and distances


def place(ivf: Any, bits: np.ndarray, n: int) -> Placement:
    """How many rows whose bit is set each inverted list holds (one pass over the ids)."""
    STATS["count_scans"] += 1
    counts = np.array([np.count_nonzero(kept(ids, bits, n)) for ids in ids_by_list(ivf)],
                      np.int64)
    return Placement.of(ivf, counts)


def pack(found: Placement) -> bytes:
    return np.asarray(found.counts, "<i8").tobytes()


def unpack(data: bytes, ivf: Any, count: int) -> Placement | None:
    """Counts packed by :func:`pack`, or None when they cannot be this index's counts
    of a filter keeping ``count`` rows."""
    nlist = int(ivf.nlist)
    if len(data) != 8 * nlist:
        return None
    counts = np.frombuffer(data, "<i8").astype(np.int64)
    sizes = list_sizes(ivf)
    if counts.min(initial=0) < 0 or int(counts.sum()) != count or (counts > sizes).any():
        return None
    return Placement.of(ivf, counts, sizes)


@dataclass(frozen=True)
class Placement:
    """A filter's rows per inverted list, and what a query makes of them (once per
    filter, not per query: listing 4,096 list sizes alone costs 3.5 ms)."""

    counts: np.ndarray  # allowed rows in each list
    weight: np.ndarray  # how much each list counts towards ``need``
    holding: int  # lists holding any allowed row
    need: int  # lists' worth of allowed rows a query probes

    @classmethod
    def of(cls, ivf: Any, counts: np.ndarray, sizes: np.ndarray | None = None) -> Placement:
        total = max(1, int(ivf.ntotal))
        share = max(int(counts.sum()) / total, 1e-12)
        sizes = list_sizes(ivf) if sizes is None else sizes
        weight = np.minimum(1.0, counts / np.maximum(sizes, 1) / share)
        weight[counts == 0] = 0.0
        holding = int((counts > 0).sum())
        covered = max(float(weight.sum()) / int(ivf.nlist), 1e-12)
        base = max(1, int(ivf.nprobe))
        need = min(holding, max(base, math.ceil(base / math.sqrt(covered))))
        return cls(counts, weight, holding, need)


def search(index: faiss.Index, ivf: Any, q: np.ndarray, k: int, place: Placement,
           sel: Any) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) probing, per query, the nearest lists holding allowed rows
    until ``need`` lists' worth (see the module's docstring); -1 where fewer were found."""
    STATS["searches"] += 1
    if isinstance(index, faiss.IndexPreTransform):
        q = as_f32(index.apply_py(q))
    nlist, need = int(ivf.nlist), place.need
    depth = min(nlist, max(int(ivf.nprobe), math.ceil(4 * need * nlist / max(1, place.holding))))
    if not isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexFlat):
        depth = min(depth, GRAPH_DEPTH)  # a graph quantizer asked for k = nlist crawls
    rows = max(1, DEPTH_CELLS // depth)  # queries at a time: (queries x depth) lists ranked
    scores = np.empty((len(q), k), np.float32)
    ids = np.empty((len(q), k), np.int64)
    for start in range(0, len(q), rows):
        part = slice(start, start + rows)
        scores[part], ids[part] = _probe(ivf, q[part], k, place, sel, depth)
    return scores, ids


def _probe(ivf: Any, q: np.ndarray, k: int, place: Placement, sel: Any, depth: int
           ) -> tuple[np.ndarray, np.ndarray]:
    need = place.need
    dis, order = ivf.quantizer.search(q, depth)
    found = order >= 0  # a graph quantizer may return fewer lists than asked
    order = np.where(found, order, 0)
    useful = found & (place.counts[order] > 0)
    reach = np.cumsum(np.where(found, place.weight[order], 0.0), axis=1)
    stop = np.where(reach[:, -1] >= need - 1e-9,
                    np.argmax(reach >= need - 1e-9, axis=1), depth - 1) + 1
    width = int(stop.max()) if len(stop) else 1
    assign = np.where(useful[:, :width] & (np.arange(width) < stop[:, None]),
                      order[:, :width], -1).astype(np.int64)
    STATS["lists_probed"] += int((assign >= 0).sum())
    centroid = np.ascontiguousarray(dis[:, :width], np.float32)
    scores = np.empty((len(q), k), np.float32)
    ids = np.empty((len(q), k), np.int64)
    params = faiss.SearchParametersIVF(sel=sel, nprobe=width)
    ivf.search_preassigned_c(len(q), faiss.swig_ptr(q), k, faiss.swig_ptr(assign),
                             faiss.swig_ptr(centroid), faiss.swig_ptr(scores),
                             faiss.swig_ptr(ids), False, params)
    return scores, ids
