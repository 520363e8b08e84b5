"""The probe's objective on rows that stay on disk: the same f and gradient as
:class:`.lbfgs.Objective`, summed over chunks of the feature cache.

Each chunk is read as float16, turned into float32, checked for NaN/inf, and its
share of the loss, the gradient and the softmax's curvature added; the weights of the
rows (``1/n`` or class weight ``/ n``) are those of the whole set, so the sum is the
full-batch objective and L-BFGS runs unchanged on it (:func:`.lbfgs.fit_lbfgs_torch`).
Memory: one chunk and its logits at a time, whatever the number of rows.  Threads are
chosen again for every pass (a pass over millions of rows takes a minute: the load seen
when the fit started says little about the load an hour later).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..streamed import Rows, chunks
from .base import threads_for, torch_threads
from .lbfgs import MAX_FOLDED_OFFSET, Terms, assemble, block_terms


@dataclass(frozen=True)
class StreamData:
    """Training rows on disk, their targets, the standardisation applied per chunk, and
    per-class weights (None: unweighted); the counterpart of :class:`.lbfgs.Data`."""

    x: Rows
    y: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    class_weight: np.ndarray | None
    threads: int | None = None  # None: by problem size and load, each pass

    def objective(self, lam: float) -> StreamObjective:
        return StreamObjective(self, lam)


class StreamObjective:
    """f and its gradient summed chunk by chunk (see the module's docstring).  As in
    :class:`.lbfgs.Objective` the standardisation is folded into the two matmuls (no
    elementwise passes over each chunk) unless the features sit far from their mean
    (``MAX_FOLDED_OFFSET``), where each chunk is standardised first."""

    def __init__(self, data: StreamData, lam: float) -> None:
        self.data, self.lam = data, lam
        self.t = torch.from_numpy(data.y)
        n = len(data.y)
        # Row weights: None for the plain mean (1/n, applied after the sums).
        self.row = (None if data.class_weight is None
                    else torch.from_numpy(data.class_weight)[self.t] / n)
        self.scale = 1.0 / n if self.row is None else 1.0
        self.total = 1.0 if self.row is None else float(self.row.sum())
        self.mean, self.std = torch.from_numpy(data.mean), torch.from_numpy(data.scale)
        self.fold = float(np.max(np.abs(data.mean) / data.scale, initial=0.0)) \
            <= MAX_FOLDED_OFFSET
        self.a = 1 / self.std if self.fold else torch.ones_like(self.std)
        self.c = self.mean / self.std if self.fold else torch.zeros_like(self.mean)
        self.curv = 0.0

    def _chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """(float32 rows, their targets, their weights or None) per chunk."""
        for p0, (x,) in chunks([self.data.x]):
            if not self.fold:
                x = x.sub_(self.mean).div_(self.std)
            rows = slice(p0, p0 + len(x))
            yield x, self.t[rows], None if self.row is None else self.row[rows]

    def _threads(self, w: torch.Tensor) -> int:
        return threads_for(len(self.data.y) * w.shape[0] * w.shape[1], self.data.threads)

    def __call__(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        with torch_threads(self._threads(w)):
            return self._value_grad(w)

    def _value_grad(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        wz, b = w[:-1], w[-1]
        wa, bias = (self.a[:, None] * wz).T, b - self.c @ wz
        loss, sq = 0.0, 0.0
        gx, gb = torch.zeros(w.shape[1], w.shape[0] - 1), torch.zeros(w.shape[1])
        for x, t, row in self._chunks():
            part = block_terms(x, t, wa, bias, row)
            loss, sq = loss + part[0], sq + part[1]
            gx += part[2]
            gb += part[3]
        terms: Terms = (loss, sq, gx, gb)
        f, g, self.curv = assemble(w, terms, self.scale, self.total, self.a, self.c, self.lam)
        return f, g
