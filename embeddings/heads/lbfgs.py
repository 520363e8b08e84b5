"""The logistic probe's solvers: one objective, two L-BFGS implementations.

Objective (one per L2 strength ``lam``), on standardised features ``z = (x - mean) / scale``::

    f(W, b) = (1/n) sum_i c[y_i] * CE(z_i W + b, y_i) + lam/2 |W|^2

This is scikit-learn's ``LogisticRegression(C=1 / (lam * n), class_weight=...)`` objective
(same minimiser).  ``z`` is never built: the standardisation is folded into the two
matmuls (``z W = x (W / scale) - (mean / scale) W``), which saves a copy of the training
matrix and a pass over it; the matmuls are the whole cost (about 0.17 s per evaluation
at 50k x 1024 x 100 on two cores).

Every fit stops on a tolerance, not a step count: once ``|grad|^2 / (2 lam)`` is at most
``tol * f``; or once the loss changes by less than ``ftol * f`` (float32's floor).  That
quantity bounds ``f - f*`` in W (f is lam-strongly convex there) but not along the free
intercept, so it is an estimate: measured real gaps were 0.3x to 3x of it.  ``max_iter``
is only a safety net.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

# Folding (x - mean) / scale into the matmuls cancels about |mean| / scale of float32's
# digits; beyond this ratio the standardised copy is built instead (tests/test_probe.py).
MAX_FOLDED_OFFSET = 8.0


@dataclass(frozen=True)
class Data:
    """Training rows for one fit: float32 features, the standardisation still to apply
    to them (zeros and ones once applied), per-class weights (None: unweighted)."""

    x: np.ndarray
    y: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    class_weight: np.ndarray | None

    @classmethod
    def standardising(cls, x: np.ndarray, y: np.ndarray, mean: np.ndarray, scale: np.ndarray,
                      class_weight: np.ndarray | None) -> Data:
        x = np.ascontiguousarray(x, np.float32)
        if float(np.max(np.abs(mean) / scale, initial=0.0)) > MAX_FOLDED_OFFSET:
            d = x.shape[1]
            return cls((x - mean) / scale, y, np.zeros(d, np.float32), np.ones(d, np.float32),
                       class_weight)
        return cls(x, y, mean, scale, class_weight)

    def rows(self, idx: np.ndarray) -> Data:
        return Data(self.x[idx], self.y[idx], self.mean, self.scale, self.class_weight)

    def standardised(self) -> np.ndarray:
        return (self.x - self.mean) / self.scale


@dataclass(frozen=True)
class Fit:
    """One solve: ``(d + 1, k)`` weights (intercept in the last row) and how it ended."""

    w: np.ndarray
    lam: float
    iterations: int
    loss: float
    grad_max: float  # largest |gradient| entry at the end (scikit-learn's tol test)
    gap: float  # estimate of (f - f*) / f: |grad|^2 / (2 lam f)
    converged: bool  # stopped by a tolerance (gap or loss change), not by max_iter
    stop: str  # "gap", "loss change" or "max_iter"
    gamma: float = 0.0  # last curvature scale s.y / y.y: the next warm start's first step

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("w", "gamma")}


class Objective:
    """f and its gradient (by hand: autograd's temporaries cost 6% more) for one ``Data``."""

    def __init__(self, data: Data, lam: float) -> None:
        self.x, self.t = torch.from_numpy(data.x), torch.from_numpy(data.y)
        self.a = torch.from_numpy(1 / data.scale)
        self.c = torch.from_numpy(data.mean / data.scale)
        n = len(data.y)
        self.row = (torch.full((n,), 1 / n) if data.class_weight is None
                    else torch.from_numpy(data.class_weight)[self.t] / n)
        self.lam = lam

    def __call__(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        wz, b = w[:-1], w[-1]
        z = torch.addmm(b - self.c @ wz, self.x, self.a[:, None] * wz)  # logits
        top = z.max(1, keepdim=True).values
        picked = z.gather(1, self.t[:, None])[:, 0]
        z.sub_(top).exp_()  # in place, one exp: softmax, then the gradient wrt the logits
        total = z.sum(1, keepdim=True)
        ce = total.log()[:, 0] + top[:, 0] - picked
        f = float(ce @ self.row) + 0.5 * self.lam * float(wz.square().sum())
        z.div_(total)
        z[torch.arange(len(self.t)), self.t] -= 1
        z.mul_(self.row[:, None])
        g = torch.empty_like(w)
        g[-1] = z.sum(0)
        torch.mm(self.x.T, z, out=g[:-1])
        g[:-1].mul_(self.a[:, None]).sub_(self.c[:, None] * g[-1]).add_(wz, alpha=self.lam)
        return f, g


def measure(data: Data, w: np.ndarray, lam: float) -> tuple[float, torch.Tensor]:
    """(objective, gradient) at ``w``."""
    return Objective(data, lam)(torch.from_numpy(np.ascontiguousarray(w, np.float32)))


def fit_lbfgs_torch(data: Data, k: int, lam: float, init: Fit | None, max_iter: int,
                    tol: float, ftol: float, history: int = 30) -> Fit:
    """Full-batch float32 L-BFGS (Armijo backtracking) until the optimality gap estimate
    ``|grad|^2 / (2 lam)`` is at most ``tol * f`` (or the loss stops changing by more
    than ``ftol * f``, float32's floor; or ``max_iter``).  A warm start also takes the
    previous fit's curvature scale, so its first step is a real one."""
    value_grad = Objective(data, lam)
    w = torch.zeros(data.x.shape[1] + 1, k) if init is None else torch.from_numpy(init.w.copy())
    gamma = init.gamma if init is not None else 0.0
    f, g = value_grad(w)
    pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / s.y)
    it, stop = 0, "max_iter"
    while it < max_iter:
        if float(g.square().sum()) / (2 * lam) <= tol * f:
            stop = "gap"
            break
        d = _direction(g, pairs, gamma)
        gd = float((g * d).sum())
        if gd >= 0:  # not a descent direction (numerical trouble): restart
            pairs.clear()
            d, gd = -g, -float(g.square().sum())
        step = 1.0 if pairs or gamma > 0 else min(1.0, 1.0 / float(g.abs().sum()))
        for _ in range(40):
            f_new, g_new = value_grad(w + step * d)
            if f_new <= f + 1e-4 * step * gd:
                break
            step /= 2
        else:
            stop = "loss change"  # no decrease measurable in float32
            break
        s_, y_ = step * d, g_new - g
        sy = float((s_ * y_).sum())
        if sy > 1e-12:
            pairs = [*pairs[-(history - 1):], (s_, y_, 1.0 / sy)]
            gamma = sy / float((y_ * y_).sum())
        w, it = w + s_, it + 1
        change, f, g = f - f_new, f_new, g_new
        if change <= ftol * abs(f):
            stop = "loss change"
            break
    return _fit(w.numpy().copy(), lam, it, f, g, stop, gamma)


def _direction(g: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor, float]],
               gamma: float) -> torch.Tensor:
    """-H g by the L-BFGS two-loop recursion, ``H0 = gamma * I``."""
    q = -g
    alphas = []
    for s, y, rho in reversed(pairs):
        a = rho * float((s * q).sum())
        q = q - a * y
        alphas.append(a)
    if gamma > 0:
        q = q * gamma
    for (s, y, rho), a in zip(pairs, reversed(alphas), strict=True):
        q = q + (a - rho * float((y * q).sum())) * s
    return q


def fit_lbfgs_sklearn(data: Data, k: int, lam: float, init: Fit | None, max_iter: int,
                      tol: float, ftol: float) -> Fit:
    """The same objective through scikit-learn (C = 1 / (lam * n), its own L-BFGS).

    scikit-learn stops on max|grad|; that threshold is tightened (warm-started reruns)
    until the gap test of :func:`fit_lbfgs_torch` holds."""
    z, y = data.standardised(), data.y
    cw = None if data.class_weight is None else dict(enumerate(data.class_weight.tolist()))
    present = np.unique(y)
    m = LogisticRegression(C=1.0 / (lam * len(z)), max_iter=max_iter, class_weight=cw,
                           warm_start=True)
    if init is not None and len(present) > 2:  # binary: scikit-learn keeps one row
        m.coef_, m.intercept_ = init.w[:-1, present].T.copy(), init.w[-1, present].copy()
    gtol, iters = math.sqrt(2 * lam * tol / ((z.shape[1] + 1) * k)), 0
    for _ in range(4):
        m.set_params(tol=gtol)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            m.fit(z, y)
        iters += int(np.max(m.n_iter_))
        w = np.zeros((z.shape[1] + 1, k), dtype=np.float32)
        w[-1] = -1e4  # classes absent from the training rows get no probability
        if len(present) == 2:
            coef = np.vstack([-m.coef_, m.coef_]) / 2
            icpt = np.array([-m.intercept_[0], m.intercept_[0]]) / 2
        else:
            coef, icpt = m.coef_, m.intercept_
        w[:-1, present], w[-1, present] = coef.T, icpt
        loss, grad = measure(data, w, lam)
        gap = float(grad.square().sum()) / (2 * lam * loss)
        if gap <= tol or iters >= max_iter:
            break
        gtol *= math.sqrt(tol / gap) / 2
    stop = "gap" if gap <= tol else "max_iter" if iters >= max_iter else "loss change"
    return _fit(w, lam, iters, loss, grad, stop, 0.0)


def _fit(w: np.ndarray, lam: float, iters: int, loss: float, grad: torch.Tensor, stop: str,
         gamma: float) -> Fit:
    gap = float(grad.square().sum()) / (2 * lam * loss)
    return Fit(w, lam, iters, loss, float(grad.abs().max()), gap, stop != "max_iter", stop,
               gamma)


SOLVERS: dict[str, Callable[..., Fit]] = {"torch": fit_lbfgs_torch,
                                           "sklearn": fit_lbfgs_sklearn}
