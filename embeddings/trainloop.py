"""The shape of every small training loop here: seeded shuffles, rounds, early stopping.

A *round* is ``round_rows`` training rows (one epoch when the data is smaller, and at
least ``MIN_STEPS`` mini-batches), after which the model is scored on validation.
Counting rounds in rows rather than epochs makes the schedule the same at 5,000 rows and
at 5,000,000: a large set is checked (and can stop) within its first epoch instead of
after an hour, a small one still trains a few dozen steps between checks (at 4,000 rows
one epoch is 8 steps: stopping after 3 such rounds stopped before anything was learnt).
Everything is drawn from one seeded generator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

MIN_STEPS = 25  # per round: a handful of steps tells nothing yet
WARMUP = 100  # steps of linearly rising learning rate: Adam's first steps are its noisiest


def rounds(n: int, batch_size: int, round_rows: int, max_rounds: int,
           rng: np.random.Generator, min_steps: int = MIN_STEPS) -> Iterator[list[np.ndarray]]:
    """Per round, its mini-batches of row indices (random order within a batch too, so
    the first rows of a batch are a random sample of it).

    Epochs are consecutive permutations; a round may end inside one and the next round
    continues it, so every row is seen once per epoch whatever ``round_rows`` is.
    """
    per_round = max(min_steps, min(n, round_rows) // batch_size)
    order, pos = rng.permutation(n), 0
    for _ in range(max_rounds):
        batches = []
        for _ in range(per_round):
            if pos >= n:
                order, pos = rng.permutation(n), 0
            batches.append(order[pos:pos + batch_size])
            pos += batch_size
        yield batches


class EarlyStop:
    """Keeps the best state seen (by a validation score, lower is better) and says when
    ``patience`` rounds have passed without a better one."""

    def __init__(self, patience: int, first: float, state: dict[str, Any]) -> None:
        self.patience = patience
        self.history = [first]
        self.best, self.best_round, self.state = first, 0, state

    def update(self, value: float, state_fn: Any) -> bool:
        """Record round ``len(history)``'s score; True when training should stop."""
        self.history.append(value)
        r = len(self.history) - 1
        if value < self.best:
            self.best, self.best_round, self.state = value, r, state_fn()
        return r - self.best_round > self.patience

    def summary(self) -> dict[str, Any]:
        return {"rounds": len(self.history) - 1, "best_round": self.best_round,
                "val_by_round": [round(float(h), 8) for h in self.history]}


def sample_rows(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` row indices drawn without replacement, sorted (all when n <= limit)."""
    return np.arange(n) if n <= limit else np.sort(rng.choice(n, limit, replace=False))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily ``n`` intra-op torch threads (None: leave as is).  One thread is the
    better choice on a machine other jobs share (measured: the demo's two_layer adapter
    took 31 s with one thread and 185 s with two while the two cores were busy)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_state(module: Any) -> dict[str, Any]:
    """A detached copy of a module's state (what early stopping keeps)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
