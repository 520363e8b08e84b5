"""Linear-probe logistic regression that converges, with a C sweep that carries over.

The objective (one per L2 strength ``lam``, on standardised features) and its solvers
live in :mod:`.lbfgs`::

    f(W, b) = (1/n) sum_i c[y_i] * CE(z_i W + b, y_i) + lam/2 |W|^2

``c`` are 1 by default (scikit-learn's default objective and the CLIP protocol);
``class_weights=True`` makes them balanced.  The intercept is not penalised.  This is
scikit-learn's ``LogisticRegression(C=1 / (lam * n), class_weight=...)`` objective (same
minimiser), so a converged fit can be checked against it and ``to_sklearn`` rebuilds it
exactly.  Unweighted is the default because it is what the accuracy goal compares with:
on the imbalanced Debian-packages set balanced weights cost 4.6 points of accuracy and
2.9 of macro-F1 (0.663 vs 0.709; scikit-learn's defaults 0.692).

Every fit, sweep points included, stops on a tolerance, not a step count: the relative
gap estimate of :mod:`.lbfgs` at most ``tol``.  The default 1e-2 is where test accuracy
stopped moving: fits run to 1e-2 vs to 1e-4 at one lam, measured, Debian packages 0.7084
vs 0.7088, the synthetic benchmark 0.9064 vs 0.9075.  The fits on all rows after a sweep
on a subsample stop at ``final_tol`` (5e-2): the estimate is an upper bound, 2-5x the
true gap late in a fit (openclipart: 0.0156 when the true gap was 0.0067), and those fits
are not compared with each other's lam; 5e-2 instead of 1e-2 saved 4-8 of their 10-18
iterations and moved test accuracy by at most 0.12 point on the benchmark's sets.
tests/test_probe.py checks fits against scikit-learn run to 1e-10 on the same objective
and C: within ``tol``, at 1e-2 and 1e-3.  ``head.info`` records iterations, the final
max |grad|, the gap estimate, how it stopped and whether it converged (``fits`` has the
same for every sweep point).

Choosing ``lam`` (CLIP linear-probe protocol, made to carry over and to be cheap):

1. Sweep, on a seeded subsample of ``m = max(sweep_rows, sweep_fraction * n)`` train rows
   (all rows when fewer), scored on the whole validation split: the ``lambdas`` grid
   (half-decades from 1 to 1e-6) from strong to weak, each fit warm-started from the
   previous one (weights and L-BFGS memory) and run to convergence; the walk stops once
   the validation score fell ``patience`` points in a row.  Then ``refine``
   binary-search rounds around the best point, each toward its better neighbour.
   Ranked by ``select``: validation accuracy (default), ties broken by log-likelihood,
   or the other way round.  Measured: ranking by log-likelihood chose a 100x weaker
   penalty on the synthetic benchmark (0.8859 test accuracy vs 0.9079).
2. Carry over to the full train split: the best strength on m rows is not the best on n
   (more rows need less regularisation).  ``lam_m * (m/n)**a`` for each ``a`` in
   ``carry`` is fitted on all train rows (warm-started, converged) and the best on
   validation kept.  Default ``[1.0]``, a constant scikit-learn C.  The sweep itself
   must converge: a sweep stopped after a fixed 8 steps made weak penalties look good
   (the unconverged fit is implicitly regularised).

All fits share one preconditioner (:class:`.lbfgs.Precond`, ``precondition``) built
from the sweep's rows.  Threads: one for small problems, else the cores that no other
process is running on (``threads`` for the sweep, ``full_threads`` for the fits on all
rows override; see :func:`.base.threads_for`).  Refit on train only (validation stays
clean).  ``solver="torch"`` (default) is full-batch float32 L-BFGS; ``solver="sklearn"``
runs scikit-learn's L-BFGS on the same objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from ..streamed import Rows, column_stats, gather, materialise, sample
from .base import Head, threads_for, torch_threads
from .lbfgs import SOLVERS, Data, Fit, Precond
from .lbfgs_stream import StreamData
from .params import param

# Rows of the covariance behind the preconditioner (an estimate is enough).
COV_ROWS = 4096
# Features' mean and std by numpy up to this many values (torch's column reductions on
# one thread are 8x slower there; beyond, torch's threads win).
NUMPY_STATS = 2**22
# L2 strengths of the sweep (mean loss + lam/2 |W|^2 on standardised features), half a
# decade apart from 1 to 1e-6, walked from strong to weak until validation stops
# improving.
LAMBDAS = tuple(round(10 ** (-i / 2), 12) for i in range(13))

Scored = tuple[tuple[float, float], Fit]  # ((validation accuracy, log-likelihood), fit)
Rank = Callable[[tuple[float, float]], tuple[float, float]]
RANKS: dict[str, Rank] = {"loglik": lambda s: (s[1], s[0]), "accuracy": lambda s: s}


@dataclass(frozen=True)
class LogisticParams:
    solver: str = param("torch", "torch: float32 L-BFGS; sklearn: scikit-learn's L-BFGS on the "
                        "same objective", choices=tuple(SOLVERS))
    lambdas: tuple[float, ...] = param(LAMBDAS, "L2 strengths of the sweep, walked strong to "
                                       "weak", above=0, min_len=1)
    select: str = param("accuracy", "what picks the strength on validation, the other "
                        "breaking ties (loglik chose 100x weaker penalties on the synthetic "
                        "benchmark and lost 2.2 points of accuracy)", choices=tuple(RANKS))
    refine: int = param(0, "binary-search rounds around the best swept strength", low=0)
    patience: int = param(1, "sweep points past the best before the walk stops", low=1)
    sweep_rows: int = param(1024, "train rows the sweep uses at least (subsample; 512 made "
                            "openclipart's MiniLM probe 1.8x faster but chose C=1950 on its "
                            "LSA input: 6x slower, 1.8 points worse)", low=1)
    sweep_fraction: float = param(0.125, "... or this fraction of the train rows, if more",
                                  low=0, high=1)
    carry: tuple[float, ...] = param((1.0,), "exponents a of the carry-over lam*(m/n)**a to "
                                     "all rows (1: constant C)", low=0)
    tol: float = param(1e-2, "stop the sweep's fits once the relative optimality gap "
                       "estimate is below this (they are compared with each other)", above=0)
    final_tol: float = param(5e-2, "... and the fits on all train rows (after a sweep on a "
                             "subsample) at this gap (an upper bound: 2-5x the true gap "
                             "late in a fit); 5e-2 instead of 1e-2 moved test accuracy by "
                             "at most 0.12 point on the benchmark's sets", above=0)
    ftol: float = param(1e-7, "... or once the loss changes by less than this (relative)",
                        low=0)
    max_iter: int = param(500, "safety net on solver iterations per fit", low=1)
    precondition: bool = param(True, "precondition the solver along the features' strongest "
                               "principal axes (fewer iterations on correlated features)")
    standardise: bool = param(True, "standardise each feature on the train rows")
    class_weights: bool = param(False, "balanced class weights (scikit-learn's 'balanced')")
    threads: int | None = param(None, "torch threads of the sweep (default: by problem size)",
                                low=1)
    full_threads: int | None = param(None, "torch threads of the fits on all train rows "
                                     "(default: by problem size)", low=1)
    seed: int = param(0, "seed of the sweep subsample")


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def balanced_weights(y: np.ndarray, k: int) -> np.ndarray:
    """scikit-learn's 'balanced' class weights (1 for absent classes)."""
    counts = np.bincount(y, minlength=k).astype(np.float64)
    return np.where(counts > 0, len(y) / (k * np.maximum(counts, 1)), 1.0).astype(np.float32)


class LogisticHead(Head):
    """Softmax regression on one column: converged fits, a C sweep that carries over."""

    streams = True  # the fits on all rows sum over chunks (:mod:`.lbfgs_stream`)

    def _fit(self, xs: list[np.ndarray], ys: list[np.ndarray], val_xs: list[np.ndarray],
             val_ys: list[np.ndarray]) -> None:
        p = self.params
        lambdas = sorted({float(v) for v in p.lambdas}, reverse=True)
        k = len(self.tasks[0].classes)
        x, y, vx, vy = xs[0], ys[0], val_xs[0], val_ys[0]
        if isinstance(x, Rows) and p.solver != "torch":  # scikit-learn needs arrays
            (x,), (vx,) = materialise([x], self.name), materialise([vx], self.name)
        streamed = isinstance(x, Rows)
        # Elementwise passes on one thread unless the problem is large: a second thread
        # that is not scheduled on a busy machine made them 70 ms instead of a few.
        with torch_threads(threads_for(x.size, p.threads)):
            if p.standardise and streamed:
                mean, std = column_stats(x)
                self.mean, self.scale = mean, np.maximum(std, np.float32(1e-6))
            elif p.standardise and x.size <= NUMPY_STATS:  # 1.2 ms vs torch's 9 at 4k x 384
                self.mean = x.mean(0, dtype=np.float32)
                self.scale = np.maximum(x.std(0, dtype=np.float32), np.float32(1e-6))
            elif p.standardise:  # torch: one pass, 5x faster than numpy's mean and std
                std, mean = torch.std_mean(torch.from_numpy(x), dim=0, correction=0)
                self.mean, self.scale = mean.numpy(), std.clamp_min(1e-6).numpy()
            else:
                self.mean = np.zeros(x.shape[1], np.float32)
                self.scale = np.ones(x.shape[1], np.float32)
            rows = max(int(p.sweep_rows), math.ceil(p.sweep_fraction * len(x)))
            if streamed:  # the sweep's rows are held in memory: a share of the budget
                rows = min(rows, max(1, x.budget // (4 * 8 * (x.shape[1] + 1))))
            rng = np.random.default_rng(p.seed)
            sub = _subsample(len(x), rows, rng)
            cw = balanced_weights(y, k) if p.class_weights else None
            if streamed:
                full_data: Data | StreamData = StreamData(x, y, self.mean, self.scale, cw,
                                                          p.full_threads)
                sub_data = Data.standardising(gather([x], sub)[0], y[sub], self.mean,
                                              self.scale, cw)
            else:
                full_data = Data.standardising(x, y, self.mean, self.scale, cw)
                sub_data = full_data if len(sub) == len(x) else full_data.rows(sub)
            if isinstance(vx, Rows):  # model choice on a seeded validation sample
                keep = sample(len(vx), None, p.seed)
                vx, vy = gather([vx], keep)[0], vy[keep]
            vz = self._standardised(vx)
        d = x.shape[1] + 1
        rank = RANKS[p.select]

        def preconditioner(data: Data) -> Precond | None:
            """From (up to COV_ROWS of) the rows the fits will use: a subsample's own
            covariance, not the population's, is what its fits see."""
            if not p.precondition or p.solver != "torch":
                return None
            rows = _subsample(len(data.y), COV_ROWS, rng)
            with torch_threads(threads_for(len(rows) * d * d, p.threads)):
                return Precond(data, rows, seed=p.seed)

        def solve(data: Data, lam: float, init: Fit | None, pre: Precond | None,
                  tol: float) -> Fit:
            return SOLVERS[p.solver](data, k, lam, init, p.max_iter, tol, p.ftol, pre)

        pre = preconditioner(sub_data)  # also serves the fits on all rows
        with torch_threads(threads_for(len(sub) * d * k, p.threads)):
            sweep = _sweep(lambda lam, init: solve(sub_data, lam, init, pre, p.tol), vz, vy,
                           lambdas, p.refine, p.patience, rank)
        best = _best(sweep, rank)
        sweep_lambda = best[1].lam
        full: dict[float, Scored] = {}
        with torch_threads(threads_for(len(x) * d * k, p.full_threads)):
            if len(sub) < len(x):  # carry the choice over to all train rows
                init = best[1]
                for a in sorted(set(p.carry)):  # small a first: strong to weak
                    lam = best[1].lam * (len(sub) / len(x)) ** a
                    fit = solve(full_data, lam, init, pre, p.final_tol)
                    full[lam], init = (_val_score(vz, vy, fit.w), fit), fit
                best = _best(full, rank)
        score, fit = best
        self.w = fit.w
        self.info = {
            "lambda": fit.lam, "C": 1 / (fit.lam * len(x)), "val_accuracy": score[0],
            "val_loglik": score[1], "select": p.select,
            "iterations": fit.iterations, "grad_max": fit.grad_max, "gap": fit.gap,
            "converged": fit.converged, "stop": fit.stop,
            "tol": p.final_tol if full else p.tol,
            "sweep_rows": len(sub), "sweep_lambda": sweep_lambda,
            "sweep": _scores(sweep), "full": _scores(full),
            "fits": [f.record() for _, f in [*sweep.values(), *full.values()]],
            "refit_on": "train"}

    def _standardised(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return ((t - torch.from_numpy(self.mean)) / torch.from_numpy(self.scale)).numpy()

    def _scores(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        return [softmax(self._standardised(xs[0]) @ self.w[:-1] + self.w[-1])]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"coef": torch.from_numpy(self.w[:-1].T.copy()),
                "intercept": torch.from_numpy(self.w[-1].copy()),
                "scaler.mean": torch.from_numpy(np.asarray(self.mean, np.float32)),
                "scaler.scale": torch.from_numpy(np.asarray(self.scale, np.float32))}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        coef, icpt = tensors["coef"].numpy(), tensors["intercept"].numpy()
        self.w = np.vstack([coef.T, icpt[None]]).astype(np.float32)
        self.mean, self.scale = tensors["scaler.mean"].numpy(), tensors["scaler.scale"].numpy()

    def to_sklearn(self) -> Pipeline:
        """A fitted scikit-learn ``StandardScaler -> LogisticRegression`` with these weights
        (predicting class indices 0..k-1)."""
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_ = self.mean.astype(np.float64), self.scale.astype(np.float64)
        scaler.var_, scaler.n_features_in_ = scaler.scale_**2, len(self.mean)
        lr = LogisticRegression()
        lr.coef_, lr.intercept_ = self.w[:-1].T.astype(np.float64), self.w[-1].astype(np.float64)
        lr.classes_, lr.n_features_in_ = np.arange(self.w.shape[1]), len(self.mean)
        return make_pipeline(scaler, lr)


def _sweep(solve: Callable[[float, Fit | None], Fit], vz: np.ndarray, vy: np.ndarray,
           lambdas: list[float], refine: int, patience: int, rank: Rank) -> dict[float, Scored]:
    """Validation-scored fits along ``lambdas`` (strong to weak, warm-started, stopped
    ``patience`` points past the best), then ``refine`` binary-search rounds."""
    tried: dict[float, Scored] = {}
    init, worse = None, 0
    for lam in lambdas:
        fit = solve(lam, init)
        tried[lam], init = (_val_score(vz, vy, fit.w), fit), fit
        worse = 0 if _best(tried, rank)[1].lam == lam else worse + 1
        if worse >= patience:
            break
    # Half the grid's (log) spacing; half a decade when the grid has one point.
    step = math.log10(lambdas[0] / lambdas[1]) / 2 if len(lambdas) > 1 else 0.5
    for _ in range(refine):
        best = _best(tried, rank)[1]
        for lam in _toward_better(tried, best.lam, 10**step, rank):
            if lam not in tried:
                fit = solve(lam, best)
                tried[lam] = (_val_score(vz, vy, fit.w), fit)
        step /= 2
    return tried


def _toward_better(tried: Mapping[float, Scored], lam: float, factor: float,
                   rank: Rank) -> list[float]:
    """Where to refine around the best ``lam``: toward its better-scoring neighbour when it
    has one on each side (the weak side costs the most iterations, and on the benchmark
    sets the refinement never won on the worse side); else both ways, strong first."""
    stronger = [v for v in tried if v > lam]
    weaker = [v for v in tried if v < lam]
    both = [lam * factor, lam / factor]
    if not stronger or not weaker:
        return both
    better_stronger = rank(tried[min(stronger)][0]) >= rank(tried[max(weaker)][0])
    return both[:1] if better_stronger else both[1:]


def _best(tried: Mapping[float, Scored], rank: Rank) -> Scored:
    """Best validation score; among equals the stronger regularisation."""
    return tried[max(tried, key=lambda lam: (rank(tried[lam][0]), lam))]


def _scores(tried: Mapping[float, Scored]) -> dict[str, list[float]]:
    """``{lam: [validation accuracy, log-likelihood]}`` as ``head.info`` keeps them."""
    return {f"{lam:.3g}": [round(v, 6) for v in s] for lam, (s, _) in sorted(tried.items())}


def _subsample(n: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= rows else np.sort(rng.choice(n, rows, replace=False))


def _val_score(z: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Validation accuracy and mean log-likelihood.

    In torch, like the solver: a numpy matmul between two solves wakes OpenBLAS's own
    threads, which spin on after it and took the cores from the next solve (sweep fits
    ran up to 3x slower on 2 cores)."""
    wt = torch.from_numpy(w)
    logp = torch.log_softmax(torch.addmm(wt[-1], torch.from_numpy(z), wt[:-1]), 1)
    t = torch.from_numpy(y)
    hit = (logp.argmax(1) == t).double().mean()
    return float(hit), float(logp.gather(1, t[:, None]).clamp_min(-27.6).mean())


