"""The compact L-BFGS memory gives the two-loop recursion's directions: with the
preconditioner as initial matrix, through a ring buffer that wraps, with the new pair's
products taken from the gradients' (not recomputed), after a warm start and after a
pair without curvature is skipped."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from embeddings.heads.lbfgs_memory import Memory

SHAPE = (9, 3)  # (d + 1, k) weights
P = SHAPE[0] * SHAPE[1]


def problem(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A convex quadratic's Hessian and linear term, and an SPD matrix B (float64)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((P, P))
    h = a @ a.T / P + 0.05 * np.eye(P)
    c = rng.standard_normal((P, 4))
    b = c @ c.T / 4 + np.diag(rng.uniform(0.5, 2.0, P))
    return (torch.from_numpy(h), torch.from_numpy(rng.standard_normal(P)),
            torch.from_numpy(b))


def two_loop(g: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]],
             b: torch.Tensor, gamma: float) -> torch.Tensor:
    """-H g by the textbook two-loop recursion with H0 = gamma * B (float64)."""
    q, alphas = g.clone(), []
    for s, y in reversed(pairs):
        a = float(s @ q) / float(s @ y)
        q -= a * y
        alphas.append(a)
    r = gamma * (b @ q)
    for (s, y), a in zip(pairs, reversed(alphas), strict=True):
        r += s * (a - float(y @ r) / float(s @ y))
    return -r


def as_apply(b: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """B on (..., d + 1, k) float32 weights."""
    b32 = b.float()
    return lambda w: (b32 @ w.reshape(-1, P).T).T.reshape(w.shape)


def newest_gamma(pairs: list[tuple[torch.Tensor, torch.Tensor]], b: torch.Tensor) -> float:
    s, y = pairs[-1]
    return float(s @ y) / float(y @ b @ y)


def test_directions_equal_the_two_loop_recursion() -> None:
    h, lin, b = problem(0)
    memory = Memory(SHAPE, history=4, b=as_apply(b))
    w = torch.zeros(P, dtype=torch.float64)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    gamma = 1.0
    for it in range(12):  # the ring of 4 wraps twice
        g = h @ w - lin
        d = memory.direction(g.float().view(SHAPE), gamma).double().reshape(-1)
        want = two_loop(g, pairs, b, newest_gamma(pairs, b) if pairs else gamma)
        torch.testing.assert_close(d, want, rtol=2e-4, atol=1e-5 * float(want.abs().max()))
        step = 0.7 if it % 3 else 1.0
        w_new = w + step * d
        g_new = h @ w_new - lin
        memory.update(step, d.float().view(SHAPE), g_new.float().view(SHAPE))
        pairs = [*pairs, (step * d, g_new - g)][-4:]
        w = w_new
    assert len(memory) == 4


def test_a_warm_start_and_a_skipped_pair() -> None:
    h, _, b = problem(1)
    rng = np.random.default_rng(2)
    s = torch.from_numpy(rng.standard_normal((3, P)))
    y = s @ h  # curvature pairs of the quadratic (h is symmetric)
    y[1] = -s[1]  # no positive curvature: left out
    memory = Memory(SHAPE, history=5, b=as_apply(b))
    memory.start(s.float(), y.float())
    assert len(memory) == 2
    g = torch.from_numpy(rng.standard_normal(P))
    kept = [(s[0], y[0]), (s[2], y[2])]
    d = memory.direction(g.float().view(SHAPE), 1.0)
    got = d.double().reshape(-1)
    torch.testing.assert_close(got, two_loop(g, kept, b, newest_gamma(kept, b)), rtol=2e-4,
                               atol=1e-6)
    # A step whose gradient change has no curvature adds nothing.
    memory.update(1.0, d, g.float().view(SHAPE))  # gradient unchanged: y = 0
    assert len(memory) == 2
    back, _ = memory.pairs()
    torch.testing.assert_close(back.double(), torch.stack([s[0], s[2]]), rtol=1e-6, atol=1e-6)
