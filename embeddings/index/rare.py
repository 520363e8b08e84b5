"""Filtered search over few rows: score just the matching rows' codes, not the lists.

A filter keeping 1 row in 2,000 makes the IVF widening probe every list (nprobe / share
exceeds nlist) and score every code: at 20M rows that reads the whole lists file.  When a
filter keeps few rows (at most ``ENTRIES_MAX`` rows and at most ``ENTRIES_SHARE`` of the
index) this path instead

1. finds where each kept row sits in the inverted lists, (list, offset), by scanning the
   lists' id arrays once (8 bytes a row: 160 MB at 20M rows, a sixtieth of a 512-byte-code
   lists file), kept on the :class:`~.query.Allowed` so the next query with the same
   filter (``serve``, a searcher's filter cache) skips it;
2. gathers those entries' codes from the (memory-mapped) lists (kept with the entries
   when small, so the next query reads no list at all), decodes them with ``sa_decode``
   (the list number as the coarse code, so residual codecs add their centroid back) and
   scores them exactly against the queries in the index's metric.

For IVF-Flat that is the exact answer; for SQ / PQ codes it is the answer over the decoded
codes, the one a scan of every list gives.  Only plain IVF-Flat, IVF-SQ and IVF-PQ (maybe
behind a pre-transform) take it: fast-scan lists pack codes in blocks, and refine / dedup
indexes score differently.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from .core import as_f32, list_sizes

ENTRIES_MAX = 200_000  # kept rows: at most this many ...
ENTRIES_SHARE = 0.02  # ... and at most this share of the index
BLOCK = 16_384  # entries decoded and scored at a time (BLOCK x d floats)
CODES_KEPT = 32 * 2**20  # gathered codes kept with a filter's entries (10k rows of SQ8x512: 5 MB)
_CODECS = (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer, faiss.IndexIVFPQ)
_NOT = tuple(getattr(faiss, n) for n in ("IndexIVFFlatDedup", "IndexIVFPQR") if hasattr(faiss, n))

# How much the last calls scanned and scored (tests read it; never reset by the library).
STATS = {"searches": 0, "id_scans": 0, "codes_scored": 0}


@dataclass
class Entries:
    """Where the kept rows sit: parallel arrays sorted by row; and their codes, gathered
    by the first search when they take at most ``CODES_KEPT`` bytes."""

    rows: np.ndarray
    lists: np.ndarray
    offsets: np.ndarray
    codes: np.ndarray | None = None


def codec_ivf(index: faiss.Index) -> Any:
    """The IVF index whose codes this path can decode, or None."""
    inner = index.index if isinstance(index, faiss.IndexPreTransform) else index
    inner = faiss.downcast_index(inner)
    if isinstance(inner, _CODECS) and not isinstance(inner, _NOT):
        return inner
    return None


def takes(index: faiss.Index, count: int) -> bool:
    """Whether a filter keeping ``count`` rows is answered from its entries."""
    n = int(index.ntotal)
    return 0 < count <= min(ENTRIES_MAX, ENTRIES_SHARE * n) and codec_ivf(index) is not None


def entries(ivf: Any, bits: np.ndarray, n: int) -> Entries:
    """(row, list, offset) of every row whose bit is set, from one pass over the ids."""
    STATS["id_scans"] += 1
    lists, offs, rows = [], [], []
    for j, ids in enumerate(ids_by_list(ivf)):
        hit = np.flatnonzero(kept(ids, bits, n))
        if len(hit):
            lists.append(np.full(len(hit), j, np.int64))
            offs.append(hit.astype(np.int64))
            rows.append(ids[hit].astype(np.int64))
    if not rows:
        empty = np.zeros(0, np.int64)
        return Entries(empty, empty, empty)
    r, li, of = np.concatenate(rows), np.concatenate(lists), np.concatenate(offs)
    order = np.argsort(r, kind="stable")
    return Entries(r[order], li[order], of[order])


def ids_by_list(ivf: Any) -> Iterator[np.ndarray]:
    """Each inverted list's ids in list order, as views (nothing copied; empty lists as
    empty arrays, so the position is the list number)."""
    inv = ivf.invlists
    for j in range(int(ivf.nlist)):
        size = int(inv.list_size(j))
        yield faiss.rev_swig_ptr(inv.get_ids(j), size) if size else np.zeros(0, np.int64)


def kept(ids: np.ndarray, bits: np.ndarray, n: int) -> np.ndarray:
    """Bool per id: its bit is set in the packed little-endian bitmap of ``n`` rows."""
    ok = ids < n
    return ok & (bits[np.where(ok, ids, 0) >> 3] >> (ids & 7).astype(np.uint8) & 1).astype(bool)


def pack(found: Entries, ivf: Any = None) -> bytes:
    """The entries as bytes; with ``ivf``, their codes too when they take at most
    ``CODES_KEPT`` (gathered now): a new process then reads one small file instead of a
    page of the lists file per row (10,000 random reads of a cold 10 GB lists file: 3 s)."""
    head = np.concatenate([found.rows, found.lists, found.offsets]).astype("<i8").tobytes()
    if ivf is not None and found.codes is None and \
            len(found.rows) * (ivf.code_size + ivf.coarse_code_size()) <= CODES_KEPT:
        found.codes = gather(ivf, found.lists, found.offsets)
    return head + (found.codes.tobytes() if found.codes is not None else b"")


def unpack(data: bytes, count: int, n: int, width: int = 0) -> Entries | None:
    """Entries packed by :func:`pack` for ``count`` rows of ``n``, with their codes when
    packed with them (``width`` bytes each); None if they do not fit (a filter cache
    from other rows)."""
    a = np.frombuffer(data, "<i8", count=min(len(data) // 8, 3 * count))
    if len(a) != 3 * count or len(data) not in (24 * count, 24 * count + width * count):
        return None
    rows, lists, offsets = (a[i * count:(i + 1) * count].astype(np.int64) for i in range(3))
    if count and (rows.min() < 0 or rows.max() >= n or lists.min() < 0 or offsets.min() < 0):
        return None
    codes = np.frombuffer(data, np.uint8, offset=24 * count).reshape(count, width).copy() \
        if width and len(data) > 24 * count else None
    return Entries(rows, lists, offsets, codes)


def fits(found: Entries, ivf: Any) -> bool:
    """Whether every (list, offset) lies inside ``ivf``'s lists (a cached map is checked
    before any code is read through it) and cached codes carry their list numbers."""
    if not len(found.rows):
        return True
    if found.lists.max() >= ivf.nlist:
        return False
    if found.codes is not None:
        ccs = int(ivf.coarse_code_size())
        coarse = found.lists.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :ccs]
        if found.codes.shape[1] != ccs + ivf.code_size or \
                not np.array_equal(found.codes[:, :ccs], coarse):
            return False
    return bool((found.offsets < list_sizes(ivf)[found.lists]).all())


def gather(ivf: Any, lists: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The codes of the entries at (list, offset), each prefixed by its list number (the
    coarse code ``sa_decode`` reads): one pass per list holding any of them."""
    cs, ccs = int(ivf.code_size), int(ivf.coarse_code_size())
    codes = np.empty((len(lists), ccs + cs), np.uint8)
    codes[:, :ccs] = lists.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :ccs]
    inv = ivf.invlists
    order = np.argsort(lists, kind="stable")
    cut = np.flatnonzero(np.diff(lists[order])) + 1
    for a, b in zip([0, *cut.tolist()], [*cut.tolist(), len(order)]):
        at = order[a:b]
        j = int(lists[at[0]])
        size = inv.list_size(j)
        block = faiss.rev_swig_ptr(inv.get_codes(j), size * cs).reshape(size, cs)
        codes[at, ccs:] = block[offsets[at]]
    return codes


def search_entries(index: faiss.Index, q: np.ndarray, k: int, found: Entries
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` over the entries' decoded codes, in the index's metric (best first;
    equal scores: the lower row first); -1 / -inf where fewer rows exist."""
    ivf = codec_ivf(index)
    if isinstance(index, faiss.IndexPreTransform):
        q = as_f32(index.apply_py(q))
    ip = ivf.metric_type == faiss.METRIC_INNER_PRODUCT
    STATS["searches"] += 1
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    n = len(found.rows)
    if found.codes is None and n * (ivf.code_size + ivf.coarse_code_size()) <= CODES_KEPT:
        found.codes = gather(ivf, found.lists, found.offsets)
    for start in range(0, n, BLOCK):
        part = slice(start, start + BLOCK)
        codes = found.codes[part] if found.codes is not None else \
            gather(ivf, found.lists[part], found.offsets[part])
        x = as_f32(ivf.sa_decode(codes))
        STATS["codes_scored"] += len(x)
        s = q @ x.T if ip else -((q * q).sum(1)[:, None] - 2 * q @ x.T + (x * x).sum(1))
        kk = min(k, len(x))
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < len(x) else \
            np.broadcast_to(np.arange(len(x)), (len(q), len(x)))
        s_top = np.take_along_axis(s, top, 1).astype(np.float32)
        i_top = found.rows[part][top]
        best_s, best_i = _merge(best_s, best_i, s_top, i_top, k)
    return (best_s if ip else -best_s), best_i


def _merge(s1: np.ndarray, i1: np.ndarray, s2: np.ndarray, i2: np.ndarray, k: int
           ) -> tuple[np.ndarray, np.ndarray]:
    s, i = np.concatenate([s1, s2], 1), np.concatenate([i1, i2], 1)
    s = np.where(i >= 0, s, -np.inf)
    order = np.lexsort((np.where(i >= 0, i, np.iinfo(np.int64).max), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
