"""Late fusion: one head per column, log-probabilities mixed with tuned or equal weights."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .base import Head, Task, make_head
from .logistic import softmax


class LateFusionHead(Head):
    """One ``base`` head per column; log-probabilities mixed with validation-tuned weights
    (a grid over the simplex, step ``grid``) or fixed equal weights (``tune=False``)."""

    def __init__(self, tasks: Sequence[Task], dims: Sequence[int], **params: Any) -> None:
        super().__init__(tasks, dims, **params)
        self.parts = [make_head(params["base"], tasks, [d], **params.get("base_params", {}))
                      for d in self.dims]
        self.mix = np.full(len(self.dims), 1 / len(self.dims), dtype=np.float32)

    def _fit(self, xs: list[np.ndarray], ys: list[np.ndarray], val_xs: list[np.ndarray],
             val_ys: list[np.ndarray]) -> None:
        for part, x, vx in zip(self.parts, xs, val_xs, strict=True):
            part.fit([x], ys, [vx], val_ys)
        if self.params["tune"]:
            probs = [part.predict_proba([vx]) for part, vx in zip(self.parts, val_xs, strict=True)]
            steps = round(1 / self.params["grid"])
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
            ps = [np.clip(p[t], 1e-7, 1 - 1e-7) for p in probs]
            if task.multilabel:
                s = sum(wi * np.log(p / (1 - p)) for wi, p in zip(w, ps, strict=True))
                out.append(1 / (1 + np.exp(-s)))
            else:
                out.append(softmax(sum(wi * np.log(p) for wi, p in zip(w, ps, strict=True))))
        return out

    def _val_score(self, w: np.ndarray, probs: list[list[np.ndarray]],
                   ys: list[np.ndarray]) -> tuple[float, float]:
        """(accuracy summed over single-label tasks, minus the summed log-loss)."""
        acc, nll = 0.0, 0.0
        for task, p, y in zip(self.tasks, self._mixed(w, probs), ys, strict=True):
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


DEFAULTS: dict[str, Any] = dict(base="linear", base_params={}, tune=True, grid=0.1)
