"""Linear-probe logistic regression (CLIP protocol).

Features are standardised, then the L2 strength is swept on the validation
split (a coarse log grid, then binary-search refinement around the best point, as in the
CLIP paper's linear-probe protocol) and the model is refit on the train split (not
train+val: validation stays clean for early stopping and late-fusion weights elsewhere).
The sweep runs on a seeded subsample of at most ``sweep_rows`` train/val rows (on
``threads`` threads; None: torch's default), each point warm-started from the previous
one; the final fit (``max_iter`` L-BFGS steps) starts from the best sweep solution, with the L2
strength scaled by subsample/train rows (constant scikit-learn C).
``solver="torch"`` (default) is full-batch float32 L-BFGS; ``solver="sklearn"`` is
scikit-learn's L-BFGS on the same objective.  Either way the saved state is coef,
intercept, classes and the scaler, and :meth:`LogisticHead.to_sklearn` rebuilds a
scikit-learn pipeline from it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from ..errors import InputError
from .base import Head, torch_threads

# L2 strengths of the coarse sweep (mean loss + lam/2 |W|^2 on standardised features).
LAMBDAS = (1e-1, 1e-2, 1e-3, 1e-4)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def balanced_weights(y: np.ndarray, k: int) -> np.ndarray:
    """scikit-learn's 'balanced' class weights (1 for absent classes)."""
    counts = np.bincount(y, minlength=k).astype(np.float64)
    return np.where(counts > 0, len(y) / (k * np.maximum(counts, 1)), 1.0).astype(np.float32)


def fit_lbfgs_torch(z: np.ndarray, y: np.ndarray, k: int, lam: float,
                    init: np.ndarray | None, class_weight: np.ndarray | None,
                    max_iter: int) -> np.ndarray:
    """Multinomial logistic regression by full-batch float32 L-BFGS; ``(d + 1, k)`` weights
    with the (unpenalised) intercept in the last row."""
    x, t = torch.from_numpy(z), torch.from_numpy(y)
    cw = None if class_weight is None else torch.from_numpy(class_weight)
    w = torch.zeros(z.shape[1] + 1, k) if init is None else torch.from_numpy(init.copy())
    w.requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=max_iter, history_size=10,
                            tolerance_grad=1e-5, tolerance_change=1e-9,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w[:-1] + w[-1], t, weight=cw) + 0.5 * lam * w[:-1].square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy().copy()


def fit_lbfgs_sklearn(z: np.ndarray, y: np.ndarray, k: int, lam: float,
                      init: np.ndarray | None, class_weight: np.ndarray | None,
                      max_iter: int) -> np.ndarray:
    """The same objective through scikit-learn (C = 1 / (lam * n))."""
    cw = None if class_weight is None else dict(enumerate(class_weight.tolist()))
    m = LogisticRegression(C=1.0 / (lam * len(z)), max_iter=max_iter, class_weight=cw,
                           warm_start=init is not None)
    present = np.unique(y)
    if init is not None:
        m.coef_, m.intercept_ = init[:-1, present].T.copy(), init[-1, present].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        m.fit(z, y)
    w = np.zeros((z.shape[1] + 1, k), dtype=np.float32)
    w[-1] = -1e4  # classes absent from the training rows get no probability
    if len(present) == 2:  # scikit-learn stores one row for two classes
        coef = np.vstack([-m.coef_, m.coef_]) / 2
        icpt = np.array([-m.intercept_[0], m.intercept_[0]]) / 2
    else:
        coef, icpt = m.coef_, m.intercept_
    w[:-1, present], w[-1, present] = coef.T, icpt
    return w


SOLVERS: dict[str, Callable[..., np.ndarray]] = {"torch": fit_lbfgs_torch,
                                                  "sklearn": fit_lbfgs_sklearn}


class LogisticHead(Head):
    """Softmax regression on one column with the CLIP linear-probe C sweep."""

    def _fit(self, xs: list[np.ndarray], ys: list[np.ndarray], val_xs: list[np.ndarray],
             val_ys: list[np.ndarray]) -> None:
        p = self.params
        if p["solver"] not in SOLVERS:
            raise InputError(f"solver must be one of {sorted(SOLVERS)}, not {p['solver']!r}")
        solve = SOLVERS[p["solver"]]
        k = len(self.tasks[0].classes)
        x, y, vx, vy = xs[0], ys[0], val_xs[0], val_ys[0]
        if p["standardise"]:  # torch: multi-threaded, no float64 temporaries
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            self.mean = t.mean(0).numpy()
            self.scale = t.std(0, correction=0).clamp_min(1e-6).numpy()
        else:
            self.mean = np.zeros(x.shape[1], np.float32)
            self.scale = np.ones(x.shape[1], np.float32)
        z, vz = self._standardised(x), self._standardised(vx)
        cw = balanced_weights(y, k) if p["class_weights"] else None
        rng = np.random.default_rng(p["seed"])
        sub = _subsample(len(z), p["sweep_rows"], rng)
        vsub = _subsample(len(vz), p["sweep_rows"], rng)
        zs, ys_, vzs, vys = z[sub], y[sub], vz[vsub], vy[vsub]

        tried: dict[float, tuple[tuple[float, float], np.ndarray]] = {}
        w = None

        def point(lam: float, init: np.ndarray | None) -> np.ndarray:
            w = solve(zs, ys_, k, lam, init, cw, p["sweep_iter"])
            tried[lam] = (_val_score(vzs, vys, w), w)
            return w

        with torch_threads(p["threads"]):
            for lam in sorted(p["lambdas"], reverse=True):  # strong to weak: warm starts
                w = point(lam, w)
            step = np.log10(sorted(p["lambdas"])[1] / sorted(p["lambdas"])[0]) / 2
            for _ in range(p["refine"]):  # binary search around the best point
                best = max(tried, key=lambda lam: (tried[lam][0], lam))
                for lam in (best * 10**step, best / 10**step):
                    point(lam, tried[best][1])
                step /= 2
        best = max(tried, key=lambda lam: (tried[lam][0], lam))
        # lam is per mean loss: the subsample optimum, scaled to the full train size.
        lam = best * len(sub) / len(z)
        init = tried[best][1]
        self.w = solve(z, y, k, lam, init, cw, p["max_iter"]) if len(sub) < len(z) else init
        self.info = {"lambda": float(lam), "C": float(1 / (lam * len(z))),
                     "sweep": {f"{k_:.3g}": v[0][0] for k_, v in sorted(tried.items())},
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


def _subsample(n: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= rows else np.sort(rng.choice(n, rows, replace=False))


def _val_score(z: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Validation accuracy, ties broken by log-likelihood (tiny validation splits tie)."""
    p = softmax(z @ w[:-1] + w[-1])
    return float((p.argmax(1) == y).mean()), float(np.log(p[np.arange(len(y)), y] + 1e-12).mean())


DEFAULTS: dict[str, Any] = dict(
    solver="torch", lambdas=list(LAMBDAS), refine=1, sweep_rows=3072, sweep_iter=8,
    max_iter=7, standardise=True, class_weights=True, threads=None, seed=0)
