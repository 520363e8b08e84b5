"""Align stage: train an adapter from one embedding column of a run into another.

Reads pairs of ``RUN/embed`` through the store (:mod:`.align_pairs`; no model runs),
fits the ridge solution in one streaming pass (sums only, any number of rows), for
``two_layer`` also keeps a sample of at most ``max_pairs`` pairs in memory (float16; no
more than its training budget reads) and trains the branch on it, scores the adapter on
the validation pairs against the baselines (zero, the mean target, the identity when
both widths agree), and saves it under the stage's lock as ``RUN/align/NAME.json`` +
weights, bound to both columns' provenance.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from embeddings.align import (
    Adapter,
    RidgeStats,
    TwoLayerParams,
    baselines,
    save_adapter,
    scores,
    solve_ridge,
)
from embeddings.errors import InputError
from embeddings.store import Run, check_name
from embeddings.trainloop import MIN_STEPS

from .align_pairs import PairChunk, iter_pairs, plan_pairs
from .config import AlignConfig

log = logging.getLogger(__name__)
VAL_SAMPLE = 50_000  # validation pairs kept in memory for scores and early stopping


@dataclass(frozen=True)
class AlignResult:
    name: str
    path: str
    source: str
    target: str
    kind: str
    train_pairs: int
    val_pairs: int
    seconds: float
    scores: dict[str, dict[str, float]]  # adapter, ridge (two_layer), baselines
    info: dict[str, Any]


class _Sample:
    """Pairs kept in memory as float16, in the order they were read."""

    def __init__(self) -> None:
        self.x: list[np.ndarray] = []
        self.y: list[np.ndarray] = []

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        if len(x):
            self.x.append(x.astype(np.float16))
            self.y.append(y.astype(np.float16))

    def arrays(self, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.x:
            return np.zeros((0, d_in), np.float16), np.zeros((0, d_out), np.float16)
        return np.concatenate(self.x), np.concatenate(self.y)


def adapter_name(cfg: AlignConfig) -> str:
    return check_name(cfg.name or f"{cfg.source}-to-{cfg.target}", "adapter name")


def run_align(cfg: AlignConfig) -> AlignResult:
    if not 0 < cfg.val_fraction < 1:
        raise InputError(f"[align] val_fraction must be in (0, 1), not {cfg.val_fraction}")
    name = adapter_name(cfg)
    run = Run(cfg.run)
    plan = plan_pairs(run, cfg.source, cfg.target)
    t0 = time.perf_counter()
    d_in, d_out = plan.source.dim, plan.target.dim
    train, val = RidgeStats(d_in, d_out), RidgeStats(d_in, d_out)
    sample, val_sample = _Sample(), _Sample()
    # two_layer sees at most its budget of rows: a larger sample would only cost memory
    budget = cfg.max_rounds * max(TwoLayerParams.round_rows, MIN_STEPS * cfg.batch_size)
    keep = 1.0 if cfg.adapter == "ridge" else min(1.0, min(cfg.max_pairs, budget)
                                                  / max(1, plan.rows))
    val_keep = min(1.0, VAL_SAMPLE / max(1.0, plan.rows * cfg.val_fraction))
    chunks = iter_pairs(run, plan, cfg.val_fraction, cfg.exclude_splits, cfg.seed, cfg.verify)
    for c in _progress(chunks, plan.rows, cfg.progress):
        train.add(c.x[~c.val], c.y[~c.val])
        val.add(c.x[c.val], c.y[c.val])
        if cfg.adapter == "two_layer":
            t = ~c.val & (c.draw < keep)
            sample.add(c.x[t], c.y[t])
        v = c.val & (c.draw < val_keep)
        val_sample.add(c.x[v], c.y[v])
    _check_counts(train.n, val.n, plan, cfg)
    ridge = solve_ridge(train, val)
    xv, yv = (a.astype(np.float32) for a in val_sample.arrays(d_in, d_out))
    ridge_adapter = Adapter("ridge", {"w": ridge.w, "b": ridge.b})
    table = {"ridge": scores(ridge_adapter.raw(xv), yv)}
    info: dict[str, Any] = {"ridge_alpha": ridge.alpha,
                            "ridge_val_mse_by_alpha": {str(a): m for a, m in
                                                       ridge.by_alpha.items()}}
    adapter = ridge_adapter
    params: dict[str, Any] = {"alpha": ridge.alpha}
    if cfg.adapter == "two_layer":
        x, y = sample.arrays(d_in, d_out)
        p = TwoLayerParams(hidden=cfg.hidden, lr=cfg.lr, batch_size=cfg.batch_size,
                           structure=cfg.structure, max_rounds=cfg.max_rounds,
                           patience=cfg.patience, precision=cfg.precision, seed=cfg.seed,
                           threads=cfg.threads)
        from embeddings.align import fit_two_layer

        tensors, fit = fit_two_layer(x, y, xv, yv, ridge, p, progress=cfg.progress)
        adapter = Adapter("two_layer", tensors)
        table = {"two_layer": scores(adapter.raw(xv), yv), **table}
        params = {"alpha": ridge.alpha, **asdict(p)}
        info |= {"two_layer": fit, "sample_pairs": len(x)}
    table |= baselines(xv, yv, (train.sy / train.n).astype(np.float32))
    seconds = time.perf_counter() - t0
    info |= {"train_pairs": train.n, "val_pairs": val.n, "val_scored": len(xv),
             "train_s": round(seconds, 3), "exclude_splits": list(cfg.exclude_splits),
             "val_fraction": cfg.val_fraction, "seed": cfg.seed, "val": table[cfg.adapter],
             "scores": table}
    adapter.params, adapter.source, adapter.target, adapter.info = (
        params, plan.source, plan.target, info)
    with run.lock("align"):
        path = save_adapter(adapter, run.align.writable(name))
    return AlignResult(name, str(path), cfg.source, cfg.target, cfg.adapter, train.n, val.n,
                       seconds, table, info)


def _check_counts(n_train: int, n_val: int, plan: Any, cfg: AlignConfig) -> None:
    if n_train < 2 or n_val < 1:
        raise InputError(
            f"too few pairs of {plan.source.name} -> {plan.target.name} to train and "
            f"validate an adapter ({n_train} train, {n_val} validation; splits "
            f"{list(cfg.exclude_splits)} are left out): embed more rows, lower "
            "--exclude-splits or raise --val-fraction")


def _progress(chunks: Any, total: int, show: bool) -> Any:
    if not show:
        yield from chunks
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="row", desc="align: reading pairs", leave=False) as bar:
        for c in chunks:
            bar.update(len(c.val))
            yield c


def format_result(r: AlignResult) -> str:
    """The validation table the CLI prints."""
    lines = [f"align {r.source} -> {r.target} ({r.kind}): {r.train_pairs} training pairs, "
             f"{r.val_pairs} validation pairs, {r.seconds:.1f} s",
             f"  {'':<10} {'val mse':>10} {'cosine':>8}"]
    for name, s in r.scores.items():
        lines.append(f"  {name:<10} {s['mse']:>10.6f} {s['cosine']:>8.3f}")
    if "identity" not in r.scores:
        lines.append("  (no identity baseline: the two columns have different widths)")
    lines.append(f"saved: {r.path}")
    return "\n".join(lines)


__all__ = ["AlignResult", "PairChunk", "adapter_name", "format_result", "run_align"]
