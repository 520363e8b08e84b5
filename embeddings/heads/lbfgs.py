"""The logistic probe's solvers: one objective, two L-BFGS implementations.

Objective (one per L2 strength ``lam``), on standardised features ``z = (x - mean) / scale``::

    f(W, b) = (1/n) sum_i c[y_i] * CE(z_i W + b, y_i) + lam/2 |W|^2

This is scikit-learn's ``LogisticRegression(C=1 / (lam * n), class_weight=...)`` objective
(same minimiser).  ``z`` is never built: the standardisation is folded into the two
matmuls (``z W = x (W / scale) - (mean / scale) W``), which saves a copy of the training
matrix and a pass over it; the matmuls are the whole cost (about 0.17 s per evaluation
at 50k x 1024 x 100 on two cores).

Every fit stops on a tolerance, not a step count: once :func:`gap_estimate` is at most
``tol`` (relative to f); or once the loss changes by less than ``ftol * f`` (float32's
floor).  ``max_iter`` is only a safety net.  The torch solver is preconditioned along the
features' strongest principal axes (:class:`Precond`) and keeps its L-BFGS memory across
warm starts (:func:`fit_lbfgs_torch`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
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

    def objective(self, lam: float) -> Objective:
        """f and its gradient on these rows (streamed rows: :mod:`.lbfgs_stream`)."""
        return Objective(self, lam)


@dataclass(frozen=True)
class Fit:
    """One solve: ``(d + 1, k)`` weights (intercept in the last row) and how it ended."""

    w: np.ndarray
    lam: float
    iterations: int
    loss: float
    grad_max: float  # largest |gradient| entry at the end (scikit-learn's tol test)
    gap: float  # estimate of (f - f*) / f (gap_estimate)
    converged: bool  # stopped by a tolerance (gap or loss change), not by max_iter
    stop: str  # "gap", "loss change" or "max_iter"
    gamma: float = 0.0  # last curvature scale s.y / y.y: the next warm start's first step
    # The last L-BFGS pairs (step, gradient change) in W: a warm start's curvature memory.
    pairs: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    def record(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("w", "gamma", "pairs")}


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
        self.curv = 0.0  # at the last evaluation

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
        k = max(z.shape[1] - 1, 1)  # the softmax's mean curvature per class (the intercept's)
        self.curv = float((1 - z.square().sum(1)) @ self.row) / (k * float(self.row.sum()))
        z[torch.arange(len(self.t)), self.t] -= 1
        z.mul_(self.row[:, None])
        g = torch.empty_like(w)
        g[-1] = z.sum(0)
        g[:-1] = torch.mm(z.T, self.x).T  # 1.4x faster than x.T @ z (row-major x)
        g[:-1].mul_(self.a[:, None]).sub_(self.c[:, None] * g[-1]).add_(wz, alpha=self.lam)
        return f, g

    def curvature(self, w: torch.Tensor) -> float:
        """The softmax's mean curvature per class at ``w``: E[1 - sum_j p_j^2] / (k - 1),
        the scalar c of :class:`Precond` (1/k at uniform p, smaller once confident)."""
        wz, b = w[:-1], w[-1]
        p = torch.softmax(torch.addmm(b - self.c @ wz, self.x, self.a[:, None] * wz), 1)
        k = max(w.shape[1] - 1, 1)
        return float((1 - p.square().sum(1)) @ (self.row / self.row.sum())) / k


def measure(data: Data, w: np.ndarray, lam: float) -> tuple[float, torch.Tensor, float]:
    """(objective, gradient, intercept curvature) at ``w``."""
    objective = Objective(data, lam)
    f, g = objective(torch.from_numpy(np.ascontiguousarray(w, np.float32)))
    return f, g, objective.curv


def gap_estimate(g: torch.Tensor, lam: float, curv: float, f: float) -> float:
    """Relative optimality gap estimate ``(f - f*) / f``: ``|g_W|^2 / (2 lam)`` bounds it
    in W (lam-strongly convex there); the free intercept adds ``|g_b|^2 / (2 h)``, h its
    curvature (the softmax's, measured at the same point), so the test does not stop
    while the intercept alone is still far off."""
    return (float(g[:-1].square().sum()) / (2 * lam)
            + float(g[-1].square().sum()) / (2 * max(curv, lam))) / max(f, 1e-30)


class Precond:
    """A preconditioner from the features' strongest principal axes, shared by every fit
    of a sweep.

    The Hessian of the objective in W is close to ``c * Sigma + lam * I`` (Sigma: the
    standardised features' covariance, ``c``: the softmax's mean curvature per class,
    1/k at the start and measured at a warm start).  Solving for ``V`` with ``W = P V``,
    ``P = U diag(1 / sqrt(c s + lam)) U^T`` on the top ``rank`` axes (eigenvalues ``s``)
    and ``1 / sqrt(c s_floor + lam)`` on the rest, brings the correlated directions that
    slow L-BFGS down (raw pixels, embedding coordinates that move together) to the
    scale of the others.  Only axes of more than the mean variance (1) are shrunk:
    scaling up the weak ones too cut the iterations on raw pixels as much but doubled
    them on MiniLM embeddings, whose curvature along weak axes is far from ``c s``.
    The axes come from a randomised subspace iteration on the sweep's rows (a few
    products with the data instead of a d x d eigendecomposition)."""

    def __init__(self, data: Data, rows: np.ndarray, rank: int = 64, seed: int = 0) -> None:
        z = torch.from_numpy(data.x[rows])
        z = (z - torch.from_numpy(data.mean)) / torch.from_numpy(data.scale)
        m, d = z.shape
        r = min(rank, d // 2)
        q = torch.randn(d, min(d, r + 16), generator=torch.Generator().manual_seed(seed))
        for _ in range(3):  # subspace iteration on z^T z
            q = torch.linalg.qr(z.T @ (z @ q))[0]
        zq = z @ q
        s, v = torch.linalg.eigh(zq.T @ zq / m)
        s, v = s.flip(0), v.flip(1)
        self.floor = max(1.0, float(s[r]))  # the variance assumed beyond the top axes
        self.s, self.u = s[:r].clamp_min(self.floor), q @ v[:, :r]

    def scales(self, lam: float, c: float) -> tuple[float, torch.Tensor, float]:
        """(scale of the other axes, scales of the top axes, scale of the intercept)."""
        c = max(c, 1e-6)
        return ((c * self.floor + lam) ** -0.5, (c * self.s + lam).rsqrt(), c ** -0.5)

    def apply(self, w: torch.Tensor, d: tuple[float, torch.Tensor, float],
              inverse: bool = False) -> torch.Tensor:
        """``P w`` (``P^-1 w`` if ``inverse``); P is symmetric, so ``P g`` is also the
        gradient in V of a gradient g in W.  Two small products and no temporaries
        beyond them: this runs twice per evaluation."""
        base, top, icpt = (1 / d[0], 1 / d[1], 1 / d[2]) if inverse else d
        out = torch.empty_like(w)
        t = (self.u.T @ w[:-1]).mul_((top - base)[:, None])
        torch.addmm(w[:-1], self.u, t, beta=base, out=out[:-1])
        torch.mul(w[-1:], icpt, out=out[-1:])
        return out


def fit_lbfgs_torch(data: Data, k: int, lam: float, init: Fit | None, max_iter: int,
                    tol: float, ftol: float, precond: Precond | None = None,
                    history: int = 30) -> Fit:
    """Full-batch float32 L-BFGS (Armijo backtracking) until the optimality gap estimate
    ``|grad|^2 / (2 lam)`` is at most ``tol * f`` (or the loss stops changing by more
    than ``ftol * f``, float32's floor; or ``max_iter``).  With ``precond`` the steps are
    taken in its preconditioned coordinates (the gap test stays in W).

    A warm start takes the previous fit's weights and its curvature memory: its L-BFGS
    pairs, their gradient changes moved to this ``lam`` (the penalty's Hessian is exactly
    ``lam * I`` on the weights; the data term's barely changes between neighbouring fits
    or from a subsample to all rows), so it does not re-learn the curvature from scratch:
    the warm-started sweep fits on the openclipart set took 3-4 iterations each instead
    of 3-7."""
    objective = data.objective(lam)
    w = torch.zeros(data.x.shape[1] + 1, k) if init is None else torch.from_numpy(init.w.copy())
    gamma = init.gamma if init is not None else 0.0
    scales = None
    if precond is not None:  # the curvature where this fit starts
        scales = precond.scales(lam, 1 / k if init is None else objective.curvature(w))
        w, gamma = precond.apply(w, scales, inverse=True), 1.0

    def to_v(t: torch.Tensor, grad: bool) -> torch.Tensor:  # W -> solver coordinates
        return t if scales is None else precond.apply(t, scales, inverse=not grad)

    def to_w(t: torch.Tensor, grad: bool) -> torch.Tensor:
        return t if scales is None else precond.apply(t, scales, inverse=grad)

    def value_grad(v: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(f, gradient in the solver's coordinates, gradient in W)."""
        f_, g_ = objective(to_w(v, grad=False))
        return f_, to_v(g_, grad=True), g_

    pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / s.y)
    if init is not None and init.pairs:  # all pairs through P in one product each
        s_w, y_w = (torch.cat(t, dim=1) for t in zip(*init.pairs, strict=True))
        y_w[:-1] += (lam - init.lam) * s_w[:-1]
        for s_, y_ in zip(to_v(s_w, grad=False).split(k, 1), to_v(y_w, grad=True).split(k, 1),
                          strict=True):
            sy = float((s_ * y_).sum())
            if sy > 1e-12:
                pairs.append((s_.contiguous(), y_.contiguous(), 1.0 / sy))
    if pairs:
        s_, y_, _ = pairs[-1]
        gamma = float((s_ * y_).sum()) / float((y_ * y_).sum())
    f, g, g_w = value_grad(w)
    it, stop = 0, "max_iter"
    while it < max_iter:
        if gap_estimate(g_w, lam, objective.curv, f) <= tol:
            stop = "gap"
            break
        direction = _direction(g, pairs, gamma)
        gd = float((g * direction).sum())
        if gd >= 0:  # not a descent direction (numerical trouble): restart
            pairs.clear()
            direction, gd = -g, -float(g.square().sum())
        step = 1.0 if pairs or gamma > 0 else min(1.0, 1.0 / float(g.abs().sum()))
        for _ in range(40):
            f_new, g_new, gw_new = value_grad(w + step * direction)
            if f_new <= f + 1e-4 * step * gd:
                break
            step /= 2
        else:
            stop = "loss change"  # no decrease measurable in float32
            break
        s_, y_ = step * direction, g_new - g
        sy = float((s_ * y_).sum())
        if sy > 1e-12:
            pairs = [*pairs[-(history - 1):], (s_, y_, 1.0 / sy)]
            gamma = sy / float((y_ * y_).sum())
        w, it = w + s_, it + 1
        change, f, g, g_w = f - f_new, f_new, g_new, gw_new
        if change <= ftol * abs(f):
            stop = "loss change"
            break
    memory: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
    if pairs:
        s_w = to_w(torch.cat([p[0] for p in pairs], dim=1), grad=False).split(k, 1)
        y_w = to_w(torch.cat([p[1] for p in pairs], dim=1), grad=True).split(k, 1)
        memory = tuple(zip(s_w, y_w, strict=True))
    fit = _fit(to_w(w, grad=False).numpy().copy(), lam, it, f, g_w, stop, gamma,
               objective.curv)
    return replace(fit, pairs=memory)


def _direction(g: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor, float]],
               gamma: float) -> torch.Tensor:
    """-H g by the L-BFGS two-loop recursion, ``H0 = gamma * I`` (flat views and in-place
    updates: at 385 x 20 weights the Python overhead per pair is the cost)."""
    q = -g.reshape(-1)
    alphas = []
    for s, y, rho in reversed(pairs):
        a = rho * float(torch.dot(s.reshape(-1), q))
        q.add_(y.reshape(-1), alpha=-a)
        alphas.append(a)
    if gamma > 0:
        q.mul_(gamma)
    for (s, y, rho), a in zip(pairs, reversed(alphas), strict=True):
        q.add_(s.reshape(-1), alpha=a - rho * float(torch.dot(y.reshape(-1), q)))
    return q.view_as(g)


def fit_lbfgs_sklearn(data: Data, k: int, lam: float, init: Fit | None, max_iter: int,
                      tol: float, ftol: float, precond: Precond | None = None) -> Fit:
    """The same objective through scikit-learn (C = 1 / (lam * n), its own L-BFGS).

    scikit-learn stops on max|grad|; that threshold is tightened (warm-started reruns)
    until the gap test of :func:`fit_lbfgs_torch` holds.  ``precond`` is not used."""
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
        loss, grad, curv = measure(data, w, lam)
        gap = gap_estimate(grad, lam, curv, loss)
        if gap <= tol or iters >= max_iter:
            break
        gtol *= math.sqrt(tol / gap) / 2
    stop = "gap" if gap <= tol else "max_iter" if iters >= max_iter else "loss change"
    return _fit(w, lam, iters, loss, grad, stop, 0.0, curv)


def _fit(w: np.ndarray, lam: float, iters: int, loss: float, grad: torch.Tensor, stop: str,
         gamma: float, curv: float) -> Fit:
    gap = gap_estimate(grad, lam, curv, loss)
    return Fit(w, lam, iters, loss, float(grad.abs().max()), gap, stop != "max_iter", stop,
               gamma)


SOLVERS: dict[str, Callable[..., Fit]] = {"torch": fit_lbfgs_torch,
                                           "sklearn": fit_lbfgs_sklearn}
