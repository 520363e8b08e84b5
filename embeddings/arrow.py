"""Arrow helpers shared by ingest and the image sources (kept apart so neither imports
the other for them)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def np_values(arr: pa.Array) -> np.ndarray:
    """A boolean array with nulls as False, or any other array as numpy (strings: objects)."""
    return np.asarray(pc.fill_null(arr, False)) if pa.types.is_boolean(arr.type) \
        else arr.to_numpy(zero_copy_only=False)


def take_rows(arr: pa.Array, idx: np.ndarray) -> pa.Array:
    """``arr`` at the strictly increasing positions ``idx``; a zero-copy slice when they are
    one run (usually all rows: most manifests have no rejects and no repeats)."""
    if len(idx) and int(idx[-1]) - int(idx[0]) + 1 == len(idx):
        return arr.slice(int(idx[0]), len(idx))
    return arr.take(pa.array(idx, pa.int64()))


def replace_at(arr: pa.Array, idx: np.ndarray, values: list) -> pa.Array:
    """``arr`` with the rows at positions ``idx`` replaced by ``values`` (strings)."""
    if not len(idx):
        return arr
    mask = np.zeros(len(arr), bool)
    mask[idx] = True
    return pc.replace_with_mask(arr, pa.array(mask), pa.array(values, arr.type))
