"""Stacking: model-level non-linear fusion Y = f(sum_i a_i M_i) over per-modality models.

``late`` mixes the per-modality predictions with fixed (grid-tuned) weights.  ``stack``
learns the mix: each column gets ``folds`` one-input heads (``base``), each trained on
the other folds of the training rows, so every training row has a prediction from a
model that did not see it (out-of-fold, the stacking rule: a combiner trained on
in-sample predictions learns to trust the most over-fitted part).  The combiner sees
each part's output M_i as log-probabilities (single-label), logits (multi-label) or the
standardised value (regression) and computes, per task,

    s = sum_i a_i * M_i          (a_i: one learned weight per modality and output)
    Y = s + g(s)                 (g: Linear -> GELU -> Linear, ``hidden`` wide, starting at 0)

so it starts as late fusion with equal weights and learns corrections, trained like the
torch heads (:func:`.torch_heads.train`, early stopping on the validation split, whose
part outputs come from the average of the fold models).  Predicting averages the fold
models of each column: no refit on all rows, so the parts cost ``folds`` fits each on
``(folds - 1) / folds`` of the rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import Head, Task, make_head
from .fusers import TrainParams
from .late import part_params
from .params import param
from .torch_heads import outputs, task_loss, train


@dataclass(frozen=True)
class StackParams:
    base: str = param("linear", "one-input head trained on each column, once per fold")
    base_params: dict[str, Any] = param(  # noqa: RUF009 (a default_factory field)
        {}, "parameters of the base head")
    folds: int = param(3, "folds of the out-of-fold predictions", low=2, high=10)
    hidden: int = param(32, "width of the combiner's correction g (0: the weighted sum "
                        "alone)", low=0)
    class_weights: bool = param(False, "balanced class weights in the combiner's loss")
    threads: int | None = param(None, "torch threads of the combiner", low=1)
    seed: int = param(0, "seed of the folds, every part and the combiner")

    def __post_init__(self) -> None:
        part_params(self.base, self.base_params, self.seed, "[heads.params.stack]")


class Combiner(nn.Module):
    """Per task: learned modality weights over the parts' outputs, plus a small MLP."""

    def __init__(self, m: int, tasks: Sequence[Task], hidden: int) -> None:
        super().__init__()
        self.m, self.t = m, len(tasks)
        self.a = nn.ParameterList(nn.Parameter(torch.full((m, t.outputs), 1 / m))
                                  for t in tasks)
        self.g = nn.ModuleList(self._g(t.outputs, hidden) for t in tasks)

    @staticmethod
    def _g(k: int, hidden: int) -> nn.Module:
        if not hidden:
            return nn.Sequential()
        last = nn.Linear(hidden, k)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(nn.Linear(k, hidden), nn.GELU(), last)

    def forward(self, ms: list[torch.Tensor]) -> list[torch.Tensor]:
        """``ms``: part i's output for task t at ``ms[i * tasks + t]``."""
        out = []
        for t in range(self.t):
            s = sum(self.a[t][i] * ms[i * self.t + t] for i in range(self.m))
            g = self.g[t]
            out.append(s + g(s) if len(g) else s)
        return out


class StackHead(Head):
    """Out-of-fold per-modality heads and a learned combiner (see the module doc)."""

    def __init__(self, tasks: Sequence[Task], dims: Sequence[int], params: StackParams) -> None:
        super().__init__(tasks, dims, params)
        kw = part_params(params.base, params.base_params, params.seed, "[heads.params.stack]")
        self.parts = [[make_head(params.base, tasks, [d], **kw) for _ in range(params.folds)]
                      for d in self.dims]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            self.combiner = Combiner(len(self.dims), self.tasks, params.hidden)
        for t, task in enumerate(self.tasks):  # regression: the target's scale
            if task.regression:
                self.combiner.register_buffer(f"ymean{t}", torch.zeros(1))
                self.combiner.register_buffer(f"yscale{t}", torch.ones(1))

    def _fit(self, xs: list[np.ndarray], ys: list[np.ndarray], val_xs: list[np.ndarray],
             val_ys: list[np.ndarray]) -> None:
        p = self.params
        for t, (task, y) in enumerate(zip(self.tasks, ys, strict=True)):
            if task.regression:
                getattr(self.combiner, f"ymean{t}").fill_(float(y.mean()))
                getattr(self.combiner, f"yscale{t}").fill_(max(float(y.std()), 1e-12))
        n = len(xs[0])
        fold = np.random.default_rng(p.seed).permutation(n) % p.folds
        oof = []
        for parts, x, vx in zip(self.parts, xs, val_xs, strict=True):
            out = [np.zeros((n, t.outputs), np.float32) for t in self.tasks]
            for f, part in enumerate(parts):
                rest, held = fold != f, fold == f
                part.fit([x[rest]], [y[rest] for y in ys], [vx], val_ys)
                for t, o in enumerate(part.predict_proba([x[held]])):
                    out[t][held] = o
            oof += self._features(out)
        val = [m for parts, vx in zip(self.parts, val_xs, strict=True)
               for m in self._features(self._part_mean(parts, vx))]
        scale = self._target_scale()
        loss = task_loss(self.tasks, ys, p.class_weights, scale)
        targets = [torch.from_numpy(np.ascontiguousarray(y)) for y in ys]
        val_targets = [torch.from_numpy(np.ascontiguousarray(y)) for y in val_ys]
        info = train(self.combiner, loss, oof, targets, val, val_targets,
                     TrainParams(threads=p.threads, seed=p.seed), "adamw", 1e-2)
        a = torch.stack([w.detach().mean(1) for w in self.combiner.a]).mean(0)
        self.info = {"combiner": info, "modality_weights": [round(float(v), 4) for v in a],
                     "parts": [[q.info for q in parts] for parts in self.parts]}

    def _target_scale(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {t: (getattr(self.combiner, f"ymean{t}"), getattr(self.combiner, f"yscale{t}"))
                for t, task in enumerate(self.tasks) if task.regression}

    @staticmethod
    def _part_mean(parts: Sequence[Head], x: np.ndarray) -> list[np.ndarray]:
        outs = [q.predict_proba([x]) for q in parts]
        return [np.mean([o[t] for o in outs], axis=0) for t in range(len(outs[0]))]

    def _features(self, probs: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """A part's outputs as the combiner's inputs: log-probabilities, logits, or the
        standardised value."""
        feats = []
        for t, (task, pr) in enumerate(zip(self.tasks, probs, strict=True)):
            if task.regression:
                mean, scale = self._target_scale()[t]
                feats.append((torch.from_numpy(pr) - mean) / scale)
                continue
            q = np.clip(pr, 1e-7, 1 - 1e-7)
            feats.append(torch.from_numpy(np.log(q / (1 - q)) if task.multilabel
                                          else np.log(q / q.sum(1, keepdims=True))))
        return [f.float() for f in feats]

    def _scores(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        ms = [m for parts, x in zip(self.parts, xs, strict=True)
              for m in self._features(self._part_mean(parts, x))]
        self.combiner.eval()
        with torch.no_grad():
            return outputs(self.tasks, self.combiner(ms), self._target_scale())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"combiner.{k}": v.detach().clone()
               for k, v in self.combiner.state_dict().items()}
        for i, parts in enumerate(self.parts):
            for f, part in enumerate(parts):
                out.update({f"part{i}.{f}.{k}": v for k, v in part.tensors().items()})
                out.update({f"part{i}.{f}.thresholds.{t}": torch.from_numpy(v)
                            for t, v in part.thresholds.items()})
        return out

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.combiner.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items()
                                       if k.startswith("combiner.")})
        for i, parts in enumerate(self.parts):
            for f, part in enumerate(parts):
                pre = f"part{i}.{f}."
                mine = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
                part.thresholds = {int(k.split(".")[1]): v.numpy() for k, v in mine.items()
                                   if k.startswith("thresholds.")}
                part.load_tensors({k: v for k, v in mine.items()
                                   if not k.startswith("thresholds.")})
