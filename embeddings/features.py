"""Image-level feature matrices from embedding columns (arrays in, arrays out).

Image columns already have one row per image.  Text columns have one row per caption;
:func:`caption_means` turns them into one row per image (the mean of that image's
caption vectors, re-normalised), so every head sees aligned ``(n_images, dim)`` arrays.
Sums are float32 and taken a chunk at a time (:class:`CaptionMeans`), so a column of
millions of captions never needs a float64 or float32 copy of itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

CHECK_ROWS = 65_536  # rows checked for NaN/inf at a time (bounds the boolean scratch)


def check_finite(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as a contiguous float32 2-D array, or ValueError if it holds NaN/inf."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return check_finite_rows(x, name)


def check_finite_rows(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` itself (any float dtype, no copy), or ValueError if a row holds NaN/inf."""
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (rows, dim) array, got shape {x.shape}")
    for start in range(0, len(x), CHECK_ROWS):
        bad = ~np.isfinite(x[start:start + CHECK_ROWS]).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad) + start
            total = rows.size + sum(int((~np.isfinite(x[s:s + CHECK_ROWS]).all(axis=1)).sum())
                                    for s in range(start + CHECK_ROWS, len(x), CHECK_ROWS))
            raise ValueError(f"{name}: {total} row(s) hold NaN or inf values "
                             f"(first at row {rows[0]}); re-embed or drop them")
    return x


class CaptionMeans:
    """Per-image sums of caption vectors for ``n`` images, added a chunk at a time."""

    def __init__(self, n: int, dim: int) -> None:
        self.sums = torch.zeros((n, dim), dtype=torch.float32)
        self.counts = np.zeros(n, dtype=np.int64)

    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Add caption ``vectors`` to images ``rows`` (-1: an unknown image, ignored)."""
        check_finite_rows(vectors, "caption vectors")
        known = rows >= 0
        # torch's index_add_ is a single vectorised scatter; np.add.at is ~5x slower here.
        self.sums.index_add_(0, torch.from_numpy(rows[known]),
                             torch.from_numpy(np.asarray(vectors[known], np.float32)))
        self.counts += np.bincount(rows[known], minlength=len(self.counts))

    def result(self, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(re-normalised means as ``dtype``, has-caption mask); zero rows without one.
        Normalised in place (what ``F.normalize`` computes, without a second array): the
        sums are spent."""
        out = self.sums.div_(self.sums.norm(2, 1, keepdim=True).clamp_min(1e-12))
        return out.numpy().astype(dtype, copy=False), self.counts > 0


def caption_means(
    image_ids: Sequence[str], caption_image_ids: Sequence[str], caption_vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image mean of caption vectors, re-normalised to unit length.

    Returns ``(features, has_caption)``: ``features`` is ``(len(image_ids), dim)`` float32
    with zero rows where an image has no caption; ``has_caption`` is the boolean mask of
    rows that are real.  Captions of unknown images are ignored.
    """
    if caption_vectors.ndim != 2:
        raise ValueError(f"caption vectors: expected a 2-D array, got {caption_vectors.shape}")
    if len(caption_image_ids) != len(caption_vectors):
        raise ValueError(f"{len(caption_image_ids)} caption image ids for "
                         f"{len(caption_vectors)} vectors")
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    rows = np.fromiter((index.get(i, -1) for i in caption_image_ids), dtype=np.int64,
                       count=len(caption_image_ids))
    means = CaptionMeans(len(image_ids), caption_vectors.shape[1])
    for start in range(0, len(rows), CHECK_ROWS):
        part = slice(start, start + CHECK_ROWS)
        means.add(rows[part], caption_vectors[part])
    return means.result()
