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
from .lbfgs import MAX_FOLDED_OFFSET


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
        self.row = (torch.full((n,), 1 / n) if data.class_weight is None
                    else torch.from_numpy(data.class_weight)[self.t] / n)
        self.mean, self.scale = torch.from_numpy(data.mean), torch.from_numpy(data.scale)
        self.fold = float(np.max(np.abs(data.mean) / data.scale, initial=0.0)) \
            <= MAX_FOLDED_OFFSET
        self.a = 1 / self.scale if self.fold else torch.ones_like(self.scale)
        self.c = self.mean / self.scale if self.fold else torch.zeros_like(self.mean)
        self.curv = 0.0

    def _chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(float32 rows, their targets, their weights) per chunk."""
        for p0, (x,) in chunks([self.data.x]):
            if not self.fold:
                x = x.sub_(self.mean).div_(self.scale)
            yield x, self.t[p0:p0 + len(x)], self.row[p0:p0 + len(x)]

    def _logits(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        wz, b = w[:-1], w[-1]
        return torch.addmm(b - self.c @ wz, x, self.a[:, None] * wz)

    def _threads(self, w: torch.Tensor) -> int:
        return threads_for(len(self.data.y) * w.shape[0] * w.shape[1], self.data.threads)

    def __call__(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        with torch_threads(self._threads(w)):
            return self._value_grad(w)

    def _value_grad(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        wz = w[:-1]
        f, curv = 0.0, 0.0
        g = torch.zeros_like(w)
        for x, t, row in self._chunks():
            z = self._logits(x, w)
            top = z.max(1, keepdim=True).values
            picked = z.gather(1, t[:, None])[:, 0]
            z.sub_(top).exp_()
            total = z.sum(1, keepdim=True)
            f += float((total.log()[:, 0] + top[:, 0] - picked) @ row)
            z.div_(total)
            curv += float((1 - z.square().sum(1)) @ row)
            z[torch.arange(len(t)), t] -= 1
            z.mul_(row[:, None])
            g[-1] += z.sum(0)
            g[:-1] += torch.mm(z.T, x).T
        k = max(w.shape[1] - 1, 1)
        self.curv = curv / (k * float(self.row.sum()))
        g[:-1].mul_(self.a[:, None]).sub_(self.c[:, None] * g[-1]).add_(wz, alpha=self.lam)
        return f + 0.5 * self.lam * float(wz.square().sum()), g
