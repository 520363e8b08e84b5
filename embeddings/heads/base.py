"""Head base class and registry: one interface for every classification head.

Every head takes a list of aligned feature arrays (one ``(n, dim)`` float32 array per
embedding column) and one target per :class:`Task`::

    head = make_head("gated", tasks, dims=[512, 384], seed=0)
    head.fit(train_xs, train_ys, val_xs, val_ys)    # val: early stopping, sweeps, thresholds
    probs = head.predict_proba(xs)                   # one (n, n_classes) array per task

Targets: single-label tasks take int class indices ``(n,)``; multi-label tasks a 0/1
matrix ``(n, n_classes)`` (sigmoid outputs, per-label thresholds tuned on validation);
regression tasks float values ``(n,)`` (their "probabilities" are the predicted values,
``(n, 1)``).  Each head type declares its parameters as a dataclass (:mod:`.params`):
``make_head`` checks the keyword arguments against it and the head keeps the instance.
Concrete heads live in sibling modules and are registered in the package ``__init__``;
this module imports none of them (no import cycle).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..features import check_finite
from ..metrics import best_thresholds
from ..streamed import Rows, chunks, is_streamed, materialise
from .params import parse


@dataclass(frozen=True)
class Task:
    """One target: a label column and its classes (multi-label: a list-valued column;
    regression: a numeric column, no classes)."""

    column: str
    classes: tuple[str, ...]
    multilabel: bool = False
    regression: bool = False

    @property
    def outputs(self) -> int:
        return 1 if self.regression else len(self.classes)


class Head:
    """Base class: input checks, threshold tuning and the save/load hooks.

    Subclasses implement ``_fit``, ``_scores`` (probabilities per task), ``tensors`` and
    ``load_tensors``; ``params`` is the head type's parameter dataclass, checked.
    """

    name = "head"
    streams = False  # fits on streamed inputs (embeddings.streamed.Rows) chunk by chunk

    def __init__(self, tasks: Sequence[Task], dims: Sequence[int], params: Any) -> None:
        self.tasks = tuple(tasks)
        self.dims = tuple(int(d) for d in dims)
        self.params = params
        self.thresholds: dict[int, np.ndarray] = {}
        self.info: dict[str, Any] = {}  # what fitting found (chosen C, epochs, weights)

    def fit(self, xs: Sequence[np.ndarray], ys: Sequence[np.ndarray],
            val_xs: Sequence[np.ndarray], val_ys: Sequence[np.ndarray]) -> Head:
        xs, val_xs = self.check(xs), self.check(val_xs)
        if is_streamed(xs) and not self.streams:  # float32 arrays, if they fit the budget
            xs, val_xs = materialise(xs, self.name), materialise(val_xs, self.name)
        ys = check_targets(self.tasks, ys, len(xs[0]))
        val_ys = check_targets(self.tasks, val_ys, len(val_xs[0]))
        self._fit(xs, ys, val_xs, val_ys)
        if any(task.multilabel for task in self.tasks):  # thresholds tuned on validation
            val_probs = self.predict_proba(val_xs)
            for t, task in enumerate(self.tasks):
                if task.multilabel:
                    self.thresholds[t] = best_thresholds(val_ys[t], val_probs[t])
        return self

    def predict_proba(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Class probabilities, one ``(n, n_classes)`` array per task (streamed inputs:
        a chunk at a time)."""
        xs = self.check(xs)
        if not is_streamed(xs):
            return self._scores(xs)
        parts = [self._scores(self.check([c.numpy() for c in chunk]))
                 for _, chunk in chunks(xs)]
        if not parts:
            return self._scores([np.zeros((0, d), np.float32) for d in self.dims])
        return [np.concatenate(p) for p in zip(*parts, strict=True)]

    def predict(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Class indices ``(n,)`` per single-label task; 0/1 ``(n, n_classes)`` otherwise."""
        return [self.decide(t, p) for t, p in enumerate(self.predict_proba(xs))]

    def decide(self, t: int, probs: np.ndarray) -> np.ndarray:
        if self.tasks[t].regression:
            return probs[:, 0]
        if self.tasks[t].multilabel:
            return (probs >= self.thresholds.get(t, 0.5)).astype(np.int8)
        return probs.argmax(axis=1)

    def check(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Inputs as float32 arrays, or ValueError on count, dimension, row or NaN trouble."""
        if len(xs) != len(self.dims):
            raise InputError(f"{self.name} takes {len(self.dims)} input column(s), got {len(xs)}")
        out = [x if isinstance(x, Rows) else check_finite(x, f"input {i}")  # Rows: per chunk
               for i, x in enumerate(xs)]
        for i, (x, d) in enumerate(zip(out, self.dims, strict=True)):
            if x.shape[1] != d:
                raise InputError(f"{self.name}: input {i} has dimension {x.shape[1]}, "
                                 f"the head expects {d}")
        if len({len(x) for x in out}) > 1:
            raise InputError(f"inputs have different row counts: {[len(x) for x in out]}")
        return out

    # Subclass hooks.
    def _fit(self, xs: list[np.ndarray], ys: list[np.ndarray], val_xs: list[np.ndarray],
             val_ys: list[np.ndarray]) -> None:
        raise NotImplementedError

    def _scores(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError


def check_targets(tasks: Sequence[Task], ys: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
    """Targets as int64 class indices / float32 0/1 matrices / float32 values, checked
    against ``tasks``."""
    if len(ys) != len(tasks):
        raise InputError(f"{len(tasks)} task(s) but {len(ys)} target array(s)")
    out = []
    for task, y in zip(tasks, ys, strict=True):
        y = np.asarray(y)
        if len(y) != n:
            raise InputError(f"{task.column}: {len(y)} targets for {n} feature rows")
        k = len(task.classes)
        if task.regression:
            if y.ndim != 1 or not np.issubdtype(y.dtype, np.number) \
                    or not np.isfinite(y).all():
                raise InputError(f"{task.column}: regression targets must be finite numbers")
            out.append(y.astype(np.float32))
        elif task.multilabel:
            if y.ndim != 2 or y.shape[1] != k:
                raise InputError(f"{task.column}: multi-label targets must be (n, {k})")
            out.append(y.astype(np.float32))
        else:
            if y.ndim != 1 or (n and (y.min() < 0 or y.max() >= k)):
                raise InputError(f"{task.column}: targets must be class indices in [0, {k})")
            out.append(y.astype(np.int64))
    return out


# ------------------------------------------------------------------------------ registry

@dataclass(frozen=True)
class HeadType:
    name: str
    cls: type[Head]
    inputs: str  # "one": a single column; "many": two or more (fusion)
    multilabel: bool  # supports multi-label and multi-task targets
    defaults: Any  # an instance of the head's parameter dataclass
    doc: str
    # The head embeds class names with the text tower of its (image) input's model: the
    # stage hands it ``text_encoder`` and plans it only on columns whose model has one.
    needs_text_tower: bool = False
    regression: bool = False  # takes numeric targets (MSE)

    def params(self, values: Mapping[str, Any]) -> Any:
        """``values`` checked against this head's parameters (ParamError if wrong)."""
        return parse(self.defaults, values, f"[heads.params.{self.name}]")


HEADS: dict[str, HeadType] = {}


def register_head(name: str, cls: type[Head], *, params: Any, inputs: str, multilabel: bool,
                  doc: str, needs_text_tower: bool = False, regression: bool = False) -> None:
    """Add a head type (run-time registration: tests and plugins add their own);
    ``params``: an instance of its parameter dataclass holding the defaults."""
    if inputs not in ("one", "many"):
        raise ValueError(f"inputs must be 'one' or 'many', not {inputs!r}")
    HEADS[name] = HeadType(name, cls, inputs, multilabel, params, doc, needs_text_tower,
                           regression)


def head_type(name: str) -> HeadType:
    if name not in HEADS:
        raise InputError(f"unknown head {name!r}; known: {sorted(HEADS)}")
    return HEADS[name]


def make_head(name: str, tasks: Sequence[Task], dims: Sequence[int], **params: Any) -> Head:
    """A new head of registered type ``name``; InputError if it cannot take these inputs
    or a parameter is wrong (ParamError)."""
    ht = head_type(name)
    if ht.inputs == "one" and len(dims) != 1:
        raise InputError(f"head {name!r} takes one input column, got {len(dims)}")
    if ht.inputs == "many" and len(dims) < 2:
        raise InputError(f"fusion head {name!r} needs two or more input columns, got {len(dims)}")
    if not ht.multilabel and (len(tasks) != 1 or tasks[0].multilabel):
        raise InputError(f"head {name!r} takes one single-label task; use linear, mlp or a "
                         f"fusion head for multi-label or multi-task targets")
    if any(t.regression for t in tasks) and not ht.regression:
        raise InputError(f"head {name!r} does not do regression; use linear, mlp or a fusion "
                         f"head for numeric targets")
    head = ht.cls(tasks, dims, ht.params(params))
    head.name = name
    return head


# Below this many multiply-adds per matmul (rows x width x outputs) one thread is used:
# the work (under half a millisecond) is too small to share.  Above it, threads only on
# cores no other process is running on (see threads_for).
SMALL_WORK = 8e6


def threads_for(work: float, threads: int | None) -> int:
    """Threads for a problem of ``work`` multiply-adds per pass: ``threads`` if given;
    else one for small problems, and for large ones the cores no other process is
    running on right now (at least one).  Thread pools whose threads wait for each other
    lose badly on shared cores: the probe on 3,900 x 784 raw pixels ran 0.4 s per
    iteration with two threads at load 12 on 2 cores, 20x its one-thread time."""
    if threads:
        return threads
    cores = max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0))))
    if work < SMALL_WORK or cores == 1:
        return 1
    return max(1, min(cores, cores - busy_elsewhere()))


def busy_elsewhere(samples: int = 3) -> int:
    """Runnable tasks besides this one (the fewest of a few looks at /proc/loadavg's
    ``running/total`` field); 0 where that file does not exist."""
    seen = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                seen.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return 0
    return max(0, min(seen))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily use ``n`` intra-op threads (None: leave as is).

    Threads lose a lot when other processes share the cores (measured 4x slower on 2 busy
    cores), and one thread is bitwise reproducible across machines; on a quiet machine
    they help large matmuls (1.45x on 2 cores).  See :func:`threads_for`.
    """
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}

