"""A 64-bit checksum per table row, computed on the Arrow buffers with numpy.

The hit tables (:mod:`.hits`) are memory-mapped and read a few rows at a time; hashing a
whole file to read 10 rows of it would cost more than the read.  Instead each row carries
this checksum of its fields, recomputed for the rows read.  100,000 rows take about 0.2 s
(a Python pass over the values took 2.6 s).  Not a defence against a forger (neither is
a digest without the seal): it catches a changed byte, a moved offset, a swapped value.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def row_digests(table: pa.Table) -> np.ndarray:
    """A 64-bit checksum of each row's fields, computed on the Arrow buffers with numpy
    (see the module docstring for its cost): per string a
    polynomial in its bytes with an odd base (any one changed byte changes it) and its
    length; per list the same over its strings' checksums; nulls a constant; mixed
    column after column."""
    out = np.zeros(table.num_rows, np.uint64)
    with np.errstate(over="ignore"):
        for col in table.columns:
            arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
            out = _mix(out * _K1 + _column_hash(arr))
    return out


_K1, _K2, _BASE = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(
    0x100000001B3)
_NULL = np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(31))
    return h * _K2


def _offsets(arr: pa.Array, limit: int) -> np.ndarray:
    """The array's offsets for its rows, checked to lie in ``[0, limit]`` and to rise:
    a corrupt file is never read outside its buffers (ValueError instead)."""
    raw = np.frombuffer(arr.buffers()[1], np.int32)
    if len(raw) < arr.offset + len(arr) + 1:
        raise ValueError("offsets buffer too short")
    off = raw[arr.offset:arr.offset + len(arr) + 1]
    if off[0] < 0 or off[-1] > limit or (len(off) > 1 and (np.diff(off) < 0).any()):
        raise ValueError("offsets out of range")
    return off


def _segments(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per segment ``[offsets[i], offsets[i+1])`` of ``values`` (uint64): the polynomial
    sum of ``values + 1`` in powers of the base, and its length mixed in."""
    lengths = np.diff(offsets).astype(np.int64)
    n, lo = len(lengths), int(offsets[0])
    seg = values[lo:int(offsets[-1])].astype(np.uint64) + np.uint64(1)
    if len(seg):
        pos = np.arange(len(seg), dtype=np.int64) - np.repeat(offsets[:-1] - lo, lengths)
        powers = np.cumprod(np.full(int(lengths.max()), _BASE, np.uint64))
        terms = seg * powers[pos]
        starts = (offsets[:-1] - lo)[lengths > 0]
        sums = np.zeros(n, np.uint64)
        sums[lengths > 0] = np.add.reduceat(terms, starts)
    else:
        sums = np.zeros(n, np.uint64)
    return sums * _K1 + lengths.astype(np.uint64)


def _column_hash(arr: pa.Array) -> np.ndarray:
    """Per row of ``arr`` (a string or list-of-strings array, maybe a slice): its hash,
    reading only the bytes its rows reference."""
    if pa.types.is_string(arr.type):
        data = arr.buffers()[2]
        values = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
        h = _segments(values, _offsets(arr, len(values)))
    elif pa.types.is_list(arr.type):
        off = _offsets(arr, len(arr.values))
        inner = _column_hash(arr.values.slice(int(off[0]), int(off[-1] - off[0])))
        h = _segments(inner - np.uint64(1), off - off[0])
    else:
        raise TypeError(f"no row checksum for {arr.type}")
    if arr.null_count:
        valid = arr.buffers()[0]
        if valid is None or len(valid) * 8 < arr.offset + len(arr):
            raise ValueError("validity buffer too short")
        bits = np.unpackbits(np.frombuffer(valid, np.uint8), bitorder="little")
        h = np.where(bits[arr.offset:arr.offset + len(arr)].astype(bool), h, _NULL)
    return h
