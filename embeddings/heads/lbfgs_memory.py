"""L-BFGS curvature memory in compact form, with a preconditioner as initial matrix.

The inverse-Hessian estimate after pairs ``(s_i, y_i)`` with initial matrix
``H0 = gamma * B`` (B symmetric positive definite: the probe's preconditioner squared,
or the identity) is, in the compact form of Byrd, Nocedal and Schnabel (1994)::

    H g = H0 g + S t - gamma (B Y) c,   c = R^-1 S^T g,
                                        t = R^-T ((D + gamma Y^T B Y) c - gamma (B Y)^T g)

with ``R`` the upper triangle of ``S^T Y`` and ``D`` its diagonal.  It equals the
two-loop recursion run in coordinates ``V = B^(-1/2) W`` (the pairs and products are
the same), so the solver works in W and never maps points or gradients between the two
coordinates; and a direction costs a few products with the stacked pairs instead of two
Python loops over them: on the openclipart probe (385 x 20 weights, 30 pairs) the
two-loop recursion and the coordinate maps were a third of the fit's time.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.linalg
import torch

Apply = Callable[[torch.Tensor], torch.Tensor]  # B applied to (..., d + 1, k) weights


class Memory:
    """The last ``history`` pairs and the small matrices of the compact form, kept up to
    date as pairs come.

    The rows of ``S`` and ``B Y`` sit in one preallocated ``(2 history, p)`` buffer
    (one product with it gives both ``S^T g`` and ``(B Y)^T g``; one more forms the
    direction), filled as a ring: ``order`` lists the slots oldest first, so a new pair
    overwrites one slot instead of copying the whole memory."""

    def __init__(self, shape: tuple[int, int], history: int, b: Apply | None) -> None:
        self.shape, self.history, self.b = shape, history, b
        p = shape[0] * shape[1]
        self.sb = torch.zeros(2 * history, p)  # rows: s_i in [0, h), B y_i in [h, 2h)
        self.y = torch.zeros(history, p)
        self.order: list[int] = []  # slots, oldest pair first
        self.sy = self.yby = np.empty((0, 0))  # S^T Y and Y^T B Y in age order, float64
        self.gamma = 0.0

    def _b(self, t: torch.Tensor) -> torch.Tensor:
        """B on flattened weights: one vector or rows of them."""
        if self.b is None:
            return t.clone()
        return self.b(t.view(*t.shape[:-1], *self.shape)).reshape(t.shape)

    def __len__(self) -> int:
        return len(self.order)

    def clear(self) -> None:
        self.order = []
        self.sy = self.yby = np.empty((0, 0))

    def start(self, s: torch.Tensor, y: torch.Tensor) -> None:
        """All pairs at once (rows of ``s`` and ``y``, oldest first; a warm start's
        memory); pairs without positive curvature are left out."""
        keep = torch.nonzero((s * y).sum(1) > 1e-12)[:, 0][-self.history:]
        m, h = len(keep), self.history
        self.sb[:m], self.y[:m] = s[keep], y[keep]
        self.sb[h:h + m] = self._b(self.y[:m])
        self.order = list(range(m))
        self.sy = (self.sb[:m] @ self.y[:m].T).double().numpy()
        self.yby = (self.sb[h:h + m] @ self.y[:m].T).double().numpy()
        if m:
            self.gamma = self.sy[-1, -1] / self.yby[-1, -1]

    def add(self, s: torch.Tensor, y: torch.Tensor) -> None:
        """One new pair (skipped without positive curvature, as L-BFGS does)."""
        s, y = s.reshape(-1), y.reshape(-1)
        sy = float(s @ y)
        if sy <= 1e-12:
            return
        h, drop = self.history, int(len(self) >= self.history)
        slot = self.order.pop(0) if drop else len(self)
        self.order.append(slot)
        self.sb[slot], self.y[slot] = s, y
        self.sb[h + slot] = self._b(y)
        both = (self.sb @ y).double().numpy()  # S^T y and (B Y)^T y, by slot
        row = (self.y @ s).double().numpy()[self.order]
        col, yby = both[self.order], both[h + np.array(self.order)]
        m = len(self)
        self.sy = _grow(self.sy[drop:, drop:], m)
        self.sy[:, -1], self.sy[-1, :] = col, row
        self.yby = _grow(self.yby[drop:, drop:], m)
        self.yby[:, -1] = self.yby[-1, :] = yby
        self.gamma = sy / yby[-1]

    def direction(self, g: torch.Tensor, gamma: float | None = None) -> torch.Tensor:
        """``-H g``; ``gamma`` overrides the scale of H0 while there are no pairs."""
        gamma = self.gamma if gamma is None or len(self) else gamma
        gf = g.reshape(-1)
        hg = self._b(gf)
        if gamma > 0:  # else a plain gradient step (the caller sizes it)
            hg.mul_(gamma)
        if len(self):
            h, order = self.history, np.array(self.order)
            both = (self.sb @ gf).double().numpy()
            a, bg = both[order], both[h + order] * gamma
            r = np.triu(self.sy)
            c = scipy.linalg.solve_triangular(r, a, check_finite=False)
            inner = np.diag(self.sy) * c + gamma * (self.yby @ c) - bg
            t = scipy.linalg.solve_triangular(r, inner, trans="T", check_finite=False)
            coef = np.zeros(2 * h, np.float32)
            coef[order], coef[h + order] = t, -gamma * c
            hg.addmv_(self.sb.T, torch.from_numpy(coef))
        return hg.neg_().view_as(g)

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, y) rows oldest first, for a warm start."""
        return self.sb[self.order], self.y[self.order]


def _grow(a: np.ndarray, m: int) -> np.ndarray:
    out = np.zeros((m, m))
    out[:len(a), :len(a)] = a
    return out
