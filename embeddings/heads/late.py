"""Late fusion: one head per column, log-probabilities mixed with tuned or equal weights.

The parts are any one-input head (``base``, with ``base_params``); :func:`part_params`
checks them and hands every part the fusion head's ``seed`` unless ``base_params`` sets
one, so a seed reaches every part.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import Head, Task, head_type, make_head
from .logistic import softmax
from .params import ParamError, param, parse


def part_params(base: str, values: Mapping[str, Any], seed: int, where: str) -> dict[str, Any]:
    """``values`` checked as parameters of the one-input head ``base``, with ``seed``."""
    ht = head_type(base)
    if ht.inputs != "one":
        raise ParamError(f"{where} base must be a one-input head, not the fusion {base!r}")
    checked = parse(ht.defaults, values, f"{where} base_params")
    return {"seed": seed, **values} if hasattr(checked, "seed") else dict(values)


@dataclass(frozen=True)
class LateParams:
    base: str = param("linear", "one-input head trained on each column")
    base_params: dict[str, Any] = param(  # noqa: RUF009 (a default_factory field)
        {}, "parameters of the base head, e.g. {hidden = "
                                        "[128]}")
    tune: bool = param(True, "tune the mixing weights on validation (false: equal weights)")
    grid: float = param(0.1, "step of the weight grid over the simplex", above=0, high=0.5)
    seed: int = param(0, "seed of every part (unless base_params sets one)")

    def __post_init__(self) -> None:
        part_params(self.base, self.base_params, self.seed, "[heads.params.late]")


class LateFusionHead(Head):
    """One ``base`` head per column; log-probabilities mixed with validation-tuned weights
    (a grid over the simplex, step ``grid``) or fixed equal weights (``tune=False``).
    Regression: the predicted values are mixed."""

    def __init__(self, tasks: Sequence[Task], dims: Sequence[int], params: LateParams) -> None:
        super().__init__(tasks, dims, params)
        kw = part_params(params.base, params.base_params, params.seed, "[heads.params.late]")
        self.parts = [make_head(params.base, tasks, [d], **kw) for d in self.dims]
        self.mix = np.full(len(self.dims), 1 / len(self.dims), dtype=np.float32)

    def _fit(self, xs: list[np.ndarray], ys: list[np.ndarray], val_xs: list[np.ndarray],
             val_ys: list[np.ndarray]) -> None:
        for part, x, vx in zip(self.parts, xs, val_xs, strict=True):
            part.fit([x], ys, [vx], val_ys)
        if self.params.tune:
            probs = [part.predict_proba([vx]) for part, vx in zip(self.parts, val_xs, strict=True)]
            steps = round(1 / self.params.grid)
            grid = [np.array(c) / steps for c in itertools.product(range(steps + 1),
                                                                    repeat=len(xs))
                    if sum(c) == steps]
            # Best validation score; ties (tiny splits) go to the most even weights.
            best = max(grid, key=lambda w: (self._val_score(w, probs, val_ys),
                                            -float(np.abs(w - 1 / len(w)).sum())))
            self.mix = best.astype(np.float32)  # as saved
        self.info = {"modality_weights": [round(float(w), 4) for w in self.mix],
                     "parts": [p.info for p in self.parts]}

    def _mixed(self, w: np.ndarray, probs: list[list[np.ndarray]]) -> list[np.ndarray]:
        """Weighted sum of log-probabilities (logits for multi-label), renormalised: with
        equal weights, the geometric mean of the per-modality predictions."""
        out = []
        for t, task in enumerate(self.tasks):
            if task.regression:
                out.append(sum(wi * p[t] for wi, p in zip(w, probs, strict=True)))
                continue
            ps = [np.clip(p[t], 1e-7, 1 - 1e-7) for p in probs]
            if task.multilabel:
                s = sum(wi * np.log(p / (1 - p)) for wi, p in zip(w, ps, strict=True))
                out.append(1 / (1 + np.exp(-s)))
            else:
                out.append(softmax(sum(wi * np.log(p) for wi, p in zip(w, ps, strict=True))))
        return out

    def _val_score(self, w: np.ndarray, probs: list[list[np.ndarray]],
                   ys: list[np.ndarray]) -> tuple[float, float]:
        """(accuracy summed over single-label tasks, minus the summed log-loss and the
        regression tasks' MSE relative to their variance)."""
        acc, nll = 0.0, 0.0
        for task, p, y in zip(self.tasks, self._mixed(w, probs), ys, strict=True):
            if task.regression:
                nll += float(np.mean((p[:, 0] - y) ** 2) / max(float(np.var(y)), 1e-12))
                continue
            p = np.clip(p, 1e-7, 1 - 1e-7)
            if task.multilabel:
                nll += float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
            else:
                acc += float((p.argmax(1) == y).mean())
                nll += float(-np.log(p[np.arange(len(y)), y]).mean())
        return round(acc, 6), -round(nll, 6)

    def _scores(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        return self._mixed(self.mix, [p.predict_proba([x]) for p, x in
                                      zip(self.parts, xs, strict=True)])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"mix": torch.from_numpy(self.mix.copy())}
        for i, part in enumerate(self.parts):
            out.update({f"part{i}.{k}": v for k, v in part.tensors().items()})
            out.update({f"part{i}.thresholds.{t}": torch.from_numpy(v)
                        for t, v in part.thresholds.items()})
        return out

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.mix = tensors["mix"].numpy().copy()
        for i, part in enumerate(self.parts):
            mine = {k.split(".", 1)[1]: v for k, v in tensors.items()
                    if k.startswith(f"part{i}.")}
            part.thresholds = {int(k.split(".")[1]): v.numpy() for k, v in mine.items()
                               if k.startswith("thresholds.")}
            part.load_tensors({k: v for k, v in mine.items() if not k.startswith("thresholds.")})
