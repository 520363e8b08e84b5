"""Ridge regression from one embedding space to another, in closed form and streaming.

Everything the solution and its validation error need is a handful of sums over the
rows (:class:`RidgeStats`: n, sum x, sum y, X^T X, X^T Y, sum |y|^2), so pairs are read
once, chunk by chunk, and memory is ``O(d_in * (d_in + d_out))`` whatever the number of
rows.  The regularisation is picked on the validation sums, also exactly: one
eigendecomposition of the centred X^T X, then every candidate ``alpha`` costs a few
``d^3`` products.  ``alpha`` is relative to the mean eigenvalue, so one grid serves
every dimension and scale; ``alpha = 0`` (plain least squares, on the eigenvalues above
a round-off floor) recovers a linear map exactly when the data has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

ALPHAS = (0.0, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


@dataclass
class RidgeStats:
    """Sufficient statistics of a set of pairs (float64 sums)."""

    d_in: int
    d_out: int
    n: int = 0
    sx: np.ndarray = field(init=False)
    sy: np.ndarray = field(init=False)
    xx: np.ndarray = field(init=False)
    xy: np.ndarray = field(init=False)
    yy: float = 0.0

    def __post_init__(self) -> None:
        self.sx = np.zeros(self.d_in)
        self.sy = np.zeros(self.d_out)
        self.xx = np.zeros((self.d_in, self.d_in))
        self.xy = np.zeros((self.d_in, self.d_out))

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add a chunk of pairs (rows of ``x`` and ``y``)."""
        if len(x) != len(y):
            raise ValueError(f"{len(x)} sources for {len(y)} targets")
        if not len(x):
            return
        # float32 products per chunk (the BLAS-heavy part, twice as fast), float64 sums
        # across chunks; a chunk's own round-off is far below the noise of real vectors.
        x32 = np.ascontiguousarray(x, dtype=np.float32)
        y32 = np.ascontiguousarray(y, dtype=np.float32)
        self.n += len(x)
        self.sx += x32.sum(axis=0, dtype=np.float64)
        self.sy += y32.sum(axis=0, dtype=np.float64)
        self.xx += (x32.T @ x32).astype(np.float64)
        self.xy += (x32.T @ y32).astype(np.float64)
        self.yy += float(np.einsum("ij,ij->", y32, y32, dtype=np.float64))

    def sse(self, w: np.ndarray, b: np.ndarray) -> float:
        """Sum over the pairs of ``|y - (x W + b)|^2``, from the sums alone."""
        return float(self.yy - 2 * np.sum(w * self.xy) - 2 * b @ self.sy
                     + np.sum(w * (self.xx @ w)) + 2 * b @ (w.T @ self.sx)
                     + self.n * b @ b)

    def mse(self, w: np.ndarray, b: np.ndarray) -> float:
        """Mean squared error per coordinate (what ``torch.nn.functional.mse_loss`` gives)."""
        return self.sse(w, b) / max(1, self.n * self.d_out)


@dataclass(frozen=True)
class RidgeFit:
    w: np.ndarray  # (d_in, d_out), float32
    b: np.ndarray  # (d_out,)
    alpha: float
    train_mse: float
    val_mse: float | None
    by_alpha: dict[float, float]  # validation mse of every candidate


def solve_ridge(train: RidgeStats, val: RidgeStats | None = None,
                alphas: Sequence[float] = ALPHAS) -> RidgeFit:
    """The ridge solution on ``train``; ``alpha`` chosen by validation MSE when ``val`` has
    rows (else the smallest candidate above 0, or 0 when it is the only one)."""
    if train.n < 2:
        raise ValueError(f"ridge needs at least 2 training pairs, got {train.n}")
    mx, my = train.sx / train.n, train.sy / train.n
    cxx = train.xx - train.n * np.outer(mx, mx)
    cxy = train.xy - train.n * np.outer(mx, my)
    evals, evecs = np.linalg.eigh((cxx + cxx.T) / 2)
    scale = max(float(evals.mean()), 1e-300)
    floor = max(float(evals.max()), 1e-300) * 1e-10  # round-off: treat as zero
    proj = evecs.T @ cxy
    fits: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    for a in alphas:
        lam = a * scale
        keep = evals > floor if lam == 0 else np.ones_like(evals, dtype=bool)
        inv = np.zeros_like(evals)
        inv[keep] = 1.0 / (evals[keep] + lam)
        w = evecs @ (inv[:, None] * proj)
        fits[a] = (w, my - mx @ w)
    if val is not None and val.n > 0:
        by_alpha = {a: val.mse(*fits[a]) for a in alphas}
        best = min(alphas, key=lambda a: (by_alpha[a], -a))  # ties: the stronger prior
    else:
        by_alpha = {}
        positive = [a for a in alphas if a > 0]
        best = min(positive) if positive else alphas[0]
    w, b = fits[best]
    return RidgeFit(w.astype(np.float32), b.astype(np.float32), float(best),
                    train.mse(w, b), by_alpha.get(best), by_alpha)


def fit_ridge(x: np.ndarray, y: np.ndarray, x_val: np.ndarray | None = None,
              y_val: np.ndarray | None = None, alphas: Sequence[float] = ALPHAS,
              chunk: int = 65536) -> RidgeFit:
    """:func:`solve_ridge` over arrays (the streaming path feeds :class:`RidgeStats`)."""
    train = RidgeStats(x.shape[1], y.shape[1])
    for s in range(0, len(x), chunk):
        train.add(x[s:s + chunk], y[s:s + chunk])
    val = None
    if x_val is not None and y_val is not None:
        val = RidgeStats(x.shape[1], y.shape[1])
        for s in range(0, len(x_val), chunk):
            val.add(x_val[s:s + chunk], y_val[s:s + chunk])
    return solve_ridge(train, val, alphas)
