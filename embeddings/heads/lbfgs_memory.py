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

    The rows of ``S`` and ``B Y`` sit in one preallocated ``(2 history, p)`` buffer,
    filled as a ring (``order`` lists the slots oldest first, so a new pair overwrites
    one slot instead of copying the memory).  Each iteration reads that buffer twice:
    once for ``S^T g`` and ``(B Y)^T g`` at the new gradient, once to form the
    direction.  The new pair's products with the old ones need no third pass:
    ``S^T y`` and ``(B Y)^T y`` are differences of the two gradients' products and
    ``B y`` is ``B g_new - B g`` (the form needs no ``Y^T S`` below R's diagonal)."""

    def __init__(self, shape: tuple[int, int], history: int, b: Apply | None) -> None:
        self.shape, self.history, self.b = shape, history, b
        p = shape[0] * shape[1]
        self.sb = torch.zeros(2 * history, p)  # rows: s_i in [0, h), B y_i in [h, 2h)
        self.y = torch.zeros(history, p)
        self.order: list[int] = []  # slots, oldest pair first
        # R (upper triangle of S^T Y) and Y^T B Y, pairs in age order, float64.
        self.r = self.yby = np.empty((0, 0))
        self.gamma = 0.0
        # At the last gradient seen: it, B g and the buffer's products with it (by slot).
        self.g: torch.Tensor | None = None
        self.bg = torch.empty(0)
        self.prod = np.empty(0)

    def _b(self, t: torch.Tensor) -> torch.Tensor:
        """B on flattened weights: one vector or rows of them."""
        if self.b is None:
            return t.clone()
        return self.b(t.view(*t.shape[:-1], *self.shape)).reshape(t.shape)

    def __len__(self) -> int:
        return len(self.order)

    def clear(self) -> None:
        """Forget the pairs (the last gradient's products stay valid)."""
        self.order = []
        self.r = self.yby = np.empty((0, 0))

    def start(self, s: torch.Tensor, y: torch.Tensor) -> None:
        """All pairs at once (rows of ``s`` and ``y``, oldest first; a warm start's
        memory); pairs without positive curvature are left out."""
        keep = torch.nonzero((s * y).sum(1) > 1e-12)[:, 0][-self.history:]
        m, h = len(keep), self.history
        self.sb[:m], self.y[:m] = s[keep], y[keep]
        self.sb[h:h + m] = self._b(self.y[:m])
        self.order, self.g = list(range(m)), None
        self.r = np.triu((self.sb[:m] @ self.y[:m].T).double().numpy())
        self.yby = (self.sb[h:h + m] @ self.y[:m].T).double().numpy()
        if m:
            self.gamma = self.r[-1, -1] / self.yby[-1, -1]

    def _see(self, g: torch.Tensor) -> None:
        """Products with a new gradient (once per gradient)."""
        if g is not self.g:
            self.g, self.bg = g, self._b(g.reshape(-1))
            self.prod = (self.sb @ g.reshape(-1)).double().numpy()

    def direction(self, g: torch.Tensor, gamma: float) -> torch.Tensor:
        """``-H g``; ``gamma`` is the scale of H0 while there are no pairs (0: a plain
        gradient step, the caller sizes it)."""
        self._see(g)
        if len(self):
            gamma = self.gamma
        hg = self.bg.mul(gamma) if gamma > 0 else self.bg.clone()
        if len(self):
            h, order = self.history, np.array(self.order)
            a, yb = self.prod[order], self.prod[h + order]  # S^T g, (B Y)^T g
            c = scipy.linalg.solve_triangular(self.r, a, check_finite=False)
            inner = np.diag(self.r) * c + gamma * (self.yby @ c) - gamma * yb
            t = scipy.linalg.solve_triangular(self.r, inner, trans="T", check_finite=False)
            coef = np.zeros(2 * h, np.float32)
            coef[order], coef[h + order] = t, -gamma * c
            hg.addmv_(self.sb.T, torch.from_numpy(coef))
        return hg.neg_().view_as(g)

    def update(self, step: float, direction: torch.Tensor, g_new: torch.Tensor) -> None:
        """The pair of the step just taken (``step * direction`` from the last gradient
        given to :meth:`direction`, to ``g_new``); skipped without positive curvature,
        as L-BFGS does."""
        assert self.g is not None, "update() follows direction()"
        s, y = (step * direction).reshape(-1), (g_new - self.g).reshape(-1)
        sy = float(s @ y)
        old, bg_old = self.prod, self.bg
        self._see(g_new)
        if sy <= 1e-12:
            return
        h, order = self.history, np.array(self.order, dtype=np.int64)
        by = self.bg - bg_old
        diff = self.prod - old  # S^T y and (B Y)^T y, by slot
        col, yby = diff[order], diff[h + order]
        drop = int(len(self) >= self.history)
        slot = self.order.pop(0) if drop else len(self)
        self.order.append(slot)
        self.sb[slot], self.y[slot], self.sb[h + slot] = s, y, by
        self.prod[slot], self.prod[h + slot] = float(s @ g_new.reshape(-1)), \
            float(by @ g_new.reshape(-1))
        m, new_yby = len(self), float(y @ by)
        self.r = _grow(self.r[drop:, drop:], m)
        self.r[:-1, -1], self.r[-1, -1] = col[drop:], sy
        self.yby = _grow(self.yby[drop:, drop:], m)
        self.yby[:-1, -1] = self.yby[-1, :-1] = yby[drop:]
        self.yby[-1, -1] = new_yby
        self.gamma = sy / new_yby

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, y) rows oldest first, for a warm start."""
        return self.sb[self.order], self.y[self.order]


def _grow(a: np.ndarray, m: int) -> np.ndarray:
    out = np.zeros((m, m))
    out[:len(a), :len(a)] = a
    return out
