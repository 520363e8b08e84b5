"""The logistic probe converges: it reaches the optimum of its stated objective (checked
against scikit-learn on the same objective and C, on real data: scikit-learn's bundled
digits), records how it stopped, and its sweep handles any grid."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from embeddings.heads import HEADS, Task, make_head
from embeddings.heads.lbfgs import MAX_FOLDED_OFFSET, Data
from embeddings.heads.logistic import balanced_weights

# The probe stops once |grad|^2 / (2 lam) <= tol * f, an estimate of the relative
# optimality gap (f - f*) / f; here f* is scikit-learn's optimum run to tol 1e-10.
TOL = 1e-3
DEFAULT_TOL = 1e-2
ALL = 10_000  # sweep on every train row: the fits are at the given lam


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    return x[:1200], y[:1200], x[1200:], y[1200:]


def task(k: int = 10) -> list[Task]:
    return [Task("label", tuple(str(c) for c in range(k)))]


def objective(z: np.ndarray, y: np.ndarray, coef: np.ndarray, icpt: np.ndarray,
              lam: float, weighted: bool) -> float:
    """The probe's objective in float64, written independently: mean (balanced-weighted
    if ``weighted``) cross-entropy + lam/2 |coef|^2 (intercept not penalised)."""
    logits = z.astype(np.float64) @ coef.T.astype(np.float64) + icpt
    logits -= logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    cw = balanced_weights(y, coef.shape[0]).astype(np.float64) if weighted else np.ones(10)
    return float(-(cw[y] * logp[np.arange(len(y)), y]).mean() + lam / 2 * (coef**2).sum())


@pytest.mark.parametrize("solver", ["torch", "sklearn"])
@pytest.mark.parametrize(("lam", "weighted", "tol"), [
    (1e-2, False, TOL), (1e-4, False, TOL), (1e-3, True, TOL), (1e-3, False, DEFAULT_TOL)])
def test_probe_reaches_the_optimum_of_its_objective(digits, solver: str, lam: float,
                                                    weighted: bool, tol: float) -> None:
    x, y, vx, vy = digits
    head = make_head("logistic", task(), [64], lambdas=[lam], refine=0, solver=solver,
                     sweep_rows=ALL, tol=tol, class_weights=weighted)
    assert head.params.tol == tol and HEADS["logistic"].defaults.tol == DEFAULT_TOL
    head.fit([x], [y], [vx], [vy])
    z = (x - head.mean) / head.scale
    ours = objective(z, y, head.w[:-1].T, head.w[-1], lam, weighted)

    cw = dict(enumerate(balanced_weights(y, 10).tolist())) if weighted else None
    ref = LogisticRegression(C=1 / (lam * len(z)), class_weight=cw, tol=1e-10,
                             max_iter=20_000).fit(z, y)
    best = objective(z, y, ref.coef_, ref.intercept_, lam, weighted)
    assert ours - best <= tol * best, (ours, best)
    info = head.info
    assert info["converged"] and info["stop"] == "gap" and info["gap"] <= tol
    assert info["iterations"] > 0 and info["grad_max"] > 0
    assert info["lambda"] == lam and info["C"] == pytest.approx(1 / (lam * len(z)))
    same = (head.predict([vx])[0] == ref.predict((vx - head.mean) / head.scale)).mean()
    assert same >= (0.99 if tol <= TOL else 0.98)  # 1 in 100 val rows at 1e-2


@pytest.mark.parametrize("ratio", [6.0, 1000.0])
def test_features_far_from_zero_still_reach_the_optimum(digits, ratio: float) -> None:
    """The solver folds the standardisation into its matmuls instead of building
    (x - mean) / scale, which cancels about |mean| / scale of float32's digits: up to
    MAX_FOLDED_OFFSET it folds, beyond it builds the copy.  Both must reach the optimum
    (outlier coordinates of real embeddings have large means and small spreads)."""
    x, y, vx, vy = digits
    keep = x.std(0) > 0
    x, vx = x[:, keep], vx[:, keep]
    shift = ratio * x.std(0) - x.mean(0)  # every column: mean / std == ratio
    x, vx = x + shift, vx + shift
    folded = Data.standardising(x, y, x.mean(0), x.std(0), None).mean.any()
    assert folded == (ratio <= MAX_FOLDED_OFFSET)
    lam = 1e-3
    head = make_head("logistic", task(), [x.shape[1]], lambdas=[lam], refine=0, tol=TOL,
                     sweep_rows=ALL)
    head.fit([x], [y], [vx], [vy])
    z = (x.astype(np.float64) - head.mean) / head.scale
    ours = objective(z, y, head.w[:-1].T, head.w[-1], lam, False)
    ref = LogisticRegression(C=1 / (lam * len(z)), tol=1e-10, max_iter=20_000).fit(z, y)
    best = objective(z, y, ref.coef_, ref.intercept_, lam, False)
    assert head.info["converged"] and ours - best <= TOL * best, (ours, best)


def test_one_lambda_is_a_valid_grid(digits) -> None:
    x, y, vx, vy = digits
    head = make_head("logistic", task(), [64], lambdas=[1e-3], refine=1, sweep_rows=ALL)
    head.fit([x], [y], [vx], [vy])
    # The refinement walks half a decade each way around the single point.
    assert sorted(head.info["sweep"]) == sorted(f"{v:.3g}" for v in
                                                (1e-3, 1e-3 * 10**0.5, 1e-3 / 10**0.5))
    with pytest.raises(ValueError, match="at least 1 value"):
        make_head("logistic", task(), [64], lambdas=[]).fit([x], [y], [vx], [vy])


def test_sweep_on_a_subsample_carries_over_to_all_rows(digits) -> None:
    x, y, vx, vy = digits
    head = make_head("logistic", task(), [64], sweep_rows=300, sweep_fraction=0.0,
                     carry=[0.5, 1.0])
    head.fit([x], [y], [vx], [vy])
    info = head.info
    assert info["sweep_rows"] == 300
    best_sub = info["sweep_lambda"]
    assert f"{best_sub:.3g}" in info["sweep"]
    # Both ends of the carry-over (constant C, and sqrt scaling) were fitted on all rows,
    # each to convergence, and the kept strength is one of them.
    want = sorted(f"{best_sub * (300 / len(x)) ** a:.3g}" for a in (0.5, 1.0))
    assert sorted(info["full"]) == want and f"{info['lambda']:.3g}" in want
    assert all(f["converged"] for f in info["fits"][-2:])
    assert (head.predict([vx])[0] == vy).mean() >= 0.9
