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
import pyarrow.compute as pc


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

    def find(self, h: np.ndarray, ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(level, position) of each id (``ids``: large_string), level -1 where it is new."""
        level = np.full(len(h), -1, np.int64)
        pos = np.zeros(len(h), np.int64)
        order = np.argsort(h)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(h))
        for li, lv in enumerate(self.levels):
            p = np.searchsorted(lv.hashes, h[order])[inverse]  # sorted queries: cache friendly
            hit = (p < len(lv.hashes)) & (level < 0)
            hit[hit] = lv.hashes[p[hit]] == h[hit]
            idx = np.flatnonzero(hit)
            if not len(idx):
                continue
            same = np.asarray(pc.equal(lv.ids.take(pa.array(p[idx])), ids.take(pa.array(idx))))
            level[idx[same]], pos[idx[same]] = li, p[idx[same]]
            for i in idx[~same]:  # a hash collision: look through the ids with that hash
                j = int(p[i]) + 1
                while j < len(lv.hashes) and lv.hashes[j] == h[i]:
                    if lv.ids[j] == ids[i]:
                        level[i], pos[i] = li, j
                        break
                    j += 1
        return level, pos

    def values(self, level: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Digests and caption counts of found ids."""
        digest, count = np.zeros(len(level), np.int64), np.zeros(len(level), np.int64)
        for li in np.unique(level):
            sel = level == li
            digest[sel] = self.levels[li].digest[pos[sel]]
            count[sel] = self.levels[li].count[pos[sel]]
        return digest, count

    def set_counts(self, level: np.ndarray, pos: np.ndarray, count: np.ndarray) -> None:
        for li in np.unique(level):
            sel = level == li
            self.levels[li].count[pos[sel]] = count[sel]

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
