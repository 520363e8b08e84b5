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
features' strongest principal axes (:class:`Precond`, the initial matrix of the compact
L-BFGS memory of :mod:`.lbfgs_memory`) and keeps that memory across warm starts
(:func:`fit_lbfgs_torch`).
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

from .lbfgs_memory import Memory

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
    gamma: float = 0.0  # last curvature scale s.y / y.B y: the next warm start's first step
    curv: float = 0.0  # the softmax's mean curvature at w (the next warm start's B)
    # The last L-BFGS pairs (steps, gradient changes) in W, one flattened pair per row:
    # a warm start's curvature memory.
    pairs: tuple[torch.Tensor, torch.Tensor] = (torch.empty(0), torch.empty(0))

    def record(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("w", "gamma", "curv", "pairs")}


Terms = tuple[float, float, torch.Tensor, torch.Tensor]  # see block_terms


def block_terms(x: torch.Tensor, t: torch.Tensor, wa: torch.Tensor, bias: torch.Tensor,
                row: torch.Tensor | None) -> Terms:
    """One block of rows' share of the data term, weights ``row`` (None: 1 each): the
    weighted sums of cross-entropy, of ``|p|^2`` and of ``(p - onehot) x`` (``k x d``)
    and ``p - onehot``, for logits ``wa x^T + bias`` (``wa``: ``k x d``).

    The logits are held class-major (``k x n``): the forward product and the gradient's
    ``P x`` both read the row-major features in the order BLAS prefers, and the softmax
    runs over contiguous class rows; one fused log-softmax, one exp, one dot for the
    curvature.  On 3,950 x 384 rows and 20 classes (one thread) an evaluation takes
    2.1 ms instead of 2.7 with row-major logits and a hand-made softmax (the same at
    44,703 x 384 x 57, one or two threads)."""
    hit = (t, torch.arange(len(t)))  # each row's target in the k x n logits
    p = torch.log_softmax(torch.addmm(bias[:, None], wa, x.T), 0)
    picked = p[hit]  # log-probabilities of the targets
    p.exp_()
    if row is None:
        loss, sq = -float(picked.sum()), float(torch.dot(p.view(-1), p.view(-1)))
        p[hit] -= 1
    else:  # the gradient's rows carry their weights
        pw = p.mul(row)
        loss, sq = -float(picked @ row), float(torch.dot(p.view(-1), pw.view(-1)))
        p = pw
        p[hit] -= row
    return loss, sq, torch.mm(p, x), p.sum(1)


def assemble(w: torch.Tensor, terms: Terms, scale: float, total: float, a: torch.Tensor,
             c: torch.Tensor, lam: float) -> tuple[float, torch.Tensor, float]:
    """(f, gradient, the softmax's mean curvature per class) from the summed
    :func:`block_terms` (times ``scale``; ``total``: the rows' weight after it), the
    standardisation folded back in (``z W = x (a W) - (c W)``) and the penalty added."""
    loss, sq, gx, gb = terms
    wz = w[:-1]
    g = torch.empty_like(w)
    torch.mul(gb, scale, out=g[-1])
    g[:-1] = gx.T
    g[:-1].mul_(a[:, None] * scale).sub_(c[:, None] * g[-1]).add_(wz, alpha=lam)
    k = max(w.shape[1] - 1, 1)  # the curvature per class (the intercept's)
    f = loss * scale + 0.5 * lam * float(wz.square().sum())
    return f, g, (total - sq * scale) / (k * total)


class Objective:
    """f and its gradient (by hand: autograd's temporaries cost 6% more) for one
    ``Data``: the rows as one :func:`block_terms` block."""

    def __init__(self, data: Data, lam: float) -> None:
        self.x, self.t = torch.from_numpy(data.x), torch.from_numpy(data.y)
        self.a = torch.from_numpy(1 / data.scale)
        self.c = torch.from_numpy(data.mean / data.scale)
        n = len(data.y)
        # Row weights: None for the plain mean (1/n, applied after the products).
        self.row = (None if data.class_weight is None
                    else torch.from_numpy(data.class_weight)[self.t] / n)
        self.scale = 1.0 / n if self.row is None else 1.0
        self.total = 1.0 if self.row is None else float(self.row.sum())
        self.lam = lam
        self.curv = 0.0  # at the last evaluation

    def __call__(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        wz, b = w[:-1], w[-1]
        terms = block_terms(self.x, self.t, (self.a[:, None] * wz).T, b - self.c @ wz,
                            self.row)
        f, g, self.curv = assemble(w, terms, self.scale, self.total, self.a, self.c,
                                   self.lam)
        return f, g


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
    1/k at the start, the previous fit's at a warm start).  Solving for ``V`` with
    ``W = P V``, ``P = U diag(1 / sqrt(c s + lam)) U^T`` on the top ``rank`` axes
    (eigenvalues ``s``) and ``1 / sqrt(c s_floor + lam)`` on the rest, brings the
    correlated directions that slow L-BFGS down (raw pixels, embedding coordinates that
    move together) to the scale of the others; the solver gets the same iterates in W
    with ``B = P^2`` as its initial inverse Hessian (:meth:`squared`).  Only axes of more
    than the mean variance (1) are shrunk: scaling up the weak ones too cut the
    iterations on raw pixels as much but doubled them on MiniLM embeddings, whose
    curvature along weak axes is far from ``c s``.
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
        self.ut = self.u.T.contiguous()

    def squared(self, lam: float, c: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """``B = P^2`` at this ``lam`` and curvature ``c``, applied to ``(d + 1, k)``
        weights or a stack ``(m, d + 1, k)`` of them: the L-BFGS initial matrix that
        equals solving in ``V = P^-1 W`` (:mod:`.lbfgs_memory`).
        ``B = base I + U diag(top - base) U^T`` on the feature rows, ``icpt`` on the
        intercept's: two small products (a stack as one ``d x (m k)`` matrix: 0.8 ms for
        30 pairs at d = 384, k = 20, against 1.2 ms through a broadcast matmul)."""
        c = max(c, 1e-6)
        base, icpt = 1 / (c * self.floor + lam), 1 / c
        diff = ((c * self.s + lam).reciprocal() - base)[:, None]

        def apply(w: torch.Tensor) -> torch.Tensor:
            out = torch.empty_like(w)
            if w.dim() == 2:
                t = torch.mm(self.ut, w[:-1]).mul_(diff)
                torch.addmm(w[:-1], self.u, t, beta=base, out=out[:-1])
            else:
                m, d, k = w.shape
                z = w[:, :-1].transpose(0, 1).reshape(d - 1, m * k)
                t = torch.mm(self.ut, z).mul_(diff)
                out[:, :-1] = torch.mm(self.u, t).view(d - 1, m, k).transpose(0, 1)
                out[:, :-1].add_(w[:, :-1], alpha=base)
            torch.mul(w[..., -1:, :], icpt, out=out[..., -1:, :])
            return out

        return apply


def fit_lbfgs_torch(data: Data, k: int, lam: float, init: Fit | None, max_iter: int,
                    tol: float, ftol: float, precond: Precond | None = None,
                    history: int = 30) -> Fit:
    """Full-batch float32 L-BFGS (Armijo backtracking) until the optimality gap estimate
    ``|grad|^2 / (2 lam)`` is at most ``tol * f`` (or the loss stops changing by more
    than ``ftol * f``, float32's floor; or ``max_iter``).  With ``precond`` its square is
    the initial inverse-Hessian estimate (:mod:`.lbfgs_memory`), the same iterates as
    L-BFGS in its preconditioned coordinates.

    A warm start takes the previous fit's weights and its curvature memory: its L-BFGS
    pairs, their gradient changes moved to this ``lam`` (the penalty's Hessian is exactly
    ``lam * I`` on the weights; the data term's barely changes between neighbouring fits
    or from a subsample to all rows), so it does not re-learn the curvature from scratch:
    the warm-started sweep fits on the openclipart set took 3-4 iterations each instead
    of 3-7."""
    objective = data.objective(lam)
    w = torch.zeros(data.x.shape[1] + 1, k) if init is None else torch.from_numpy(init.w.copy())
    b = None
    if precond is not None:  # the curvature where this fit starts (the previous fit's)
        b = precond.squared(lam, 1 / k if init is None else init.curv)
    memory = Memory(tuple(w.shape), history, b)
    gamma = 1.0 if b is not None else init.gamma if init is not None else 0.0
    if init is not None and len(init.pairs[0]):
        s_w, y_w = init.pairs[0], init.pairs[1].clone()
        y_w.view(-1, *w.shape)[:, :-1] += (lam - init.lam) * s_w.view(-1, *w.shape)[:, :-1]
        memory.start(s_w, y_w)
    f, g = objective(w)
    it, stop = 0, "max_iter"
    while it < max_iter:
        if gap_estimate(g, lam, objective.curv, f) <= tol:
            stop = "gap"
            break
        direction = memory.direction(g, gamma)
        gd = float((g * direction).sum())
        if gd >= 0:  # not a descent direction (numerical trouble): restart
            memory.clear()
            direction, gd = -g, -float(g.square().sum())
        step = 1.0 if len(memory) or gamma > 0 else min(1.0, 1.0 / float(g.abs().sum()))
        for _ in range(40):
            f_new, g_new = objective(w + step * direction)
            if f_new <= f + 1e-4 * step * gd:
                break
            step /= 2
        else:
            stop = "loss change"  # no decrease measurable in float32
            break
        memory.update(step, direction, g_new)
        w, it = w.add(direction, alpha=step), it + 1
        change, f, g = f - f_new, f_new, g_new
        if change <= ftol * abs(f):
            stop = "loss change"
            break
    fit = _fit(w.numpy().copy(), lam, it, f, g, stop, memory.gamma, objective.curv)
    return replace(fit, pairs=memory.pairs())


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
               gamma, curv)


SOLVERS: dict[str, Callable[..., Fit]] = {"torch": fit_lbfgs_torch,
                                           "sklearn": fit_lbfgs_sklearn}
