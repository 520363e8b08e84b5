"""The ids seen so far, exact, in a few bytes more than the ids themselves.

A dict of a million str keys costs about 150 bytes an id and, on a large dict, a cache miss
per lookup; here ids live in sorted levels of 64-bit hashes (merged like a binary counter,
so each id is re-sorted O(log n) times), with the id strings in an Arrow array beside the
hashes to confirm every hash match, so a hash collision never merges two ids.  Per id:
its digest (of image, split, label, labels) and its caption count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class _Level:
    hashes: np.ndarray  # int64, sorted
    ids: pa.Array  # string, same order
    digest: np.ndarray  # int64
    count: np.ndarray  # int64

    def take(self, order: np.ndarray) -> _Level:
        return _Level(self.hashes[order], self.ids.take(pa.array(order)), self.digest[order],
                      self.count[order])


def hashes(ids: np.ndarray) -> np.ndarray:
    """64-bit hashes of an object array of str (Python's hash: C speed, cached per str)."""
    return np.fromiter(map(hash, ids), np.int64, len(ids))


class IdIndex:
    def __init__(self) -> None:
        self.levels: list[_Level] = []
        self.size = 0

    def find(self, h: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(level, position) of each id, level -1 where the id is new."""
        level = np.full(len(h), -1, np.int64)
        pos = np.zeros(len(h), np.int64)
        order = np.argsort(h)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(h))
        for li, lv in enumerate(self.levels):
            p = np.searchsorted(lv.hashes, h[order])[inverse]  # sorted queries: cache friendly
            hit = (p < len(lv.hashes)) & (level < 0)
            hit[hit] = lv.hashes[p[hit]] == h[hit]
            for i in np.flatnonzero(hit):  # repeats (rare) and hash collisions: compare ids
                j = int(p[i])
                while j < len(lv.hashes) and lv.hashes[j] == h[i]:
                    if lv.ids[j].as_py() == ids[i]:
                        level[i], pos[i] = li, j
                        break
                    j += 1
        return level, pos

    def get(self, level: int, pos: int) -> tuple[int, int]:
        lv = self.levels[level]
        return int(lv.digest[pos]), int(lv.count[pos])

    def set_count(self, level: int, pos: int, count: int) -> None:
        self.levels[level].count[pos] = count

    def add(self, h: np.ndarray, ids: pa.Array, digest: np.ndarray, count: np.ndarray) -> None:
        """Add new, distinct ids."""
        if not len(h):
            return
        order = np.argsort(h, kind="stable")
        self.levels.append(_Level(h, ids, digest, count).take(order))
        self.size += len(h)
        while len(self.levels) > 1 and len(self.levels[-2].hashes) <= 2 * len(
                self.levels[-1].hashes):
            b, a = self.levels.pop(), self.levels.pop()
            merged = _Level(np.concatenate([a.hashes, b.hashes]),
                            pa.concat_arrays([a.ids, b.ids]),
                            np.concatenate([a.digest, b.digest]),
                            np.concatenate([a.count, b.count]))
            self.levels.append(merged.take(np.argsort(merged.hashes, kind="stable")))
