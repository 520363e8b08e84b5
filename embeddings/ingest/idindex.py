"""The ids seen so far, exact, in about 50 bytes an id plus the ids themselves.

A dict of a million str keys costs about 150 bytes an id and Python work per id; here the
ids are kept once, in the Arrow arrays they arrived in, and found through sorted levels of
their 64-bit hashes (merged in tiers of four, each merge linear, numpy only), probed
for a whole chunk at once.  Every hash match is confirmed against the id string, so a hash
collision never merges two ids.  Per id, by insertion number: its digest (of image, split,
label, labels) and its caption count.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def hashes(ids: np.ndarray) -> np.ndarray:
    """64-bit hashes of an object array of str (Python's hash: C speed, cached per str)."""
    return np.fromiter(map(hash, ids), np.int64, len(ids))


class IdIndex:
    def __init__(self) -> None:
        self.levels: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted hashes, numbers)
        self.digest = np.zeros(0, np.int64)  # by insertion number
        self.count = np.zeros(0, np.int64)
        self.chunks: list[pa.Array] = []  # the ids, in insertion order
        self.offsets: list[int] = [0]
        # A one-hash Bloom filter (8 to 16 one-byte slots an id): most lookups are of new ids,
        # and it answers "new" for about 9 in 10 of them without touching the levels.
        self.seen = np.zeros(1 << 16, bool)

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def id_strings(self, number: np.ndarray) -> pa.Array:
        """The ids with these insertion numbers."""
        chunk = np.searchsorted(self.offsets, number, side="right") - 1
        if len(chunk) and (chunk == chunk[0]).all():
            return self.chunks[chunk[0]].take(pa.array(number - self.offsets[chunk[0]]))
        return pa.array([self.chunks[c][int(n) - self.offsets[c]].as_py()
                         for c, n in zip(chunk, number)], pa.large_string())

    def find(self, h: np.ndarray, ids: pa.Array) -> np.ndarray:
        """The insertion number of each id (``ids``: large_string), -1 where it is new."""
        found = np.full(len(h), -1, np.int64)
        maybe = np.flatnonzero(self.seen[h & (len(self.seen) - 1)])
        if len(maybe) < len(h):
            found[maybe] = self.find(h[maybe], ids.take(pa.array(maybe))) if len(maybe) else []
            return found
        order = np.argsort(h)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(h))
        for keys, numbers in self.levels:
            p = np.searchsorted(keys, h[order])[inverse]  # sorted queries: cache friendly
            hit = (p < len(keys)) & (found < 0)
            hit[hit] = keys[p[hit]] == h[hit]
            idx = np.flatnonzero(hit)
            if not len(idx):
                continue
            same = np.asarray(pc.equal(self.id_strings(numbers[p[idx]]),
                                       ids.take(pa.array(idx))))
            found[idx[same]] = numbers[p[idx[same]]]
            for i in idx[~same]:  # a hash collision: look through the ids with that hash
                j = int(p[i]) + 1
                while j < len(keys) and keys[j] == h[i]:
                    if self.id_strings(numbers[j:j + 1])[0] == ids[i]:
                        found[i] = numbers[j]
                        break
                    j += 1
        return found

    def values(self, number: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Digests and caption counts of found ids."""
        return self.digest[number], self.count[number]

    def set_counts(self, number: np.ndarray, count: np.ndarray) -> None:
        self.count[number] = count

    def add(self, h: np.ndarray, ids: pa.Array, digest: np.ndarray, count: np.ndarray) -> None:
        """Add new, distinct ids (not found by :meth:`find`)."""
        if not len(h):
            return
        number = np.arange(self.size, self.size + len(h))
        self.chunks.append(ids)
        self.offsets.append(self.size + len(h))
        if self.size > len(self.digest):  # grow by doubling: amortised O(1) an id
            grow = np.zeros(max(self.size, 2 * len(self.digest)) - len(self.digest), np.int64)
            self.digest = np.concatenate([self.digest, grow])
            self.count = np.concatenate([self.count, grow])
        self.digest[number], self.count[number] = digest, count
        order = np.argsort(h)
        self.levels.append((h[order], number[order]))
        if 8 * self.size > len(self.seen):  # rebuild larger from every hash
            self.seen = np.zeros(1 << int(np.ceil(np.log2(16 * self.size))), bool)
            for keys, _ in self.levels:
                self.seen[keys & (len(self.seen) - 1)] = True
        else:
            self.seen[h & (len(self.seen) - 1)] = True
        # Tiered: four levels of a size become one, so a hash is re-sorted log4(n) times.
        while len(self.levels) >= 4 and len(self.levels[-4][0]) <= 2 * len(self.levels[-1][0]):
            d, c, b, a = (self.levels.pop() for _ in range(4))
            self.levels.append(_merge(_merge(a, b), _merge(c, d)))


def _merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted levels as one, in linear time (plus a binary search per item of ``b``)."""
    n = len(a[0]) + len(b[0])
    at_b = np.searchsorted(a[0], b[0], side="right") + np.arange(len(b[0]))
    at_a = np.ones(n, bool)
    at_a[at_b] = False
    keys, numbers = np.empty(n, np.int64), np.empty(n, np.int64)
    keys[at_a], keys[at_b] = a[0], b[0]
    numbers[at_a], numbers[at_b] = a[1], b[1]
    return keys, numbers
