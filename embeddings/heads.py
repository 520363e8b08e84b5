"""Classification heads on cached embeddings: one registry, one interface, safe save/load.

Every head takes a list of aligned feature arrays (one ``(n, dim)`` float32 array per
embedding column) and one target per :class:`Task`::

    head = make_head("gated", tasks, dims=[512, 384], seed=0)
    head.fit(train_xs, train_ys, val_xs, val_ys)    # val: early stopping, sweeps, thresholds
    probs = head.predict_proba(xs)                   # one (n, n_classes) array per task
    save_head(head, "runs/demo/heads/models/gated", inputs=provenance)
    head, meta = load_head("runs/demo/heads/models/gated")

Targets: single-label tasks take int class indices ``(n,)``; multi-label tasks a 0/1
matrix ``(n, n_classes)`` (sigmoid outputs, per-label thresholds tuned on validation).
Saved heads are a safetensors file of weights plus a JSON description (no pickle) that
records the provenance of each input column; :func:`check_inputs_match` refuses shards
made by another model.  Heads: :mod:`embeddings.probe` (logistic, zero-shot) and
:mod:`embeddings.fusion` (torch linear/MLP, early and late fusion).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .features import check_finite
from .metrics import best_thresholds
from .shards import FormatError, atomic_write_bytes, atomic_write_json

FORMAT = "embeddings.head"
FORMAT_VERSION = 1
# Provenance keys that must agree between the training shards and the shards predicted on.
BINDING_KEYS = ("type", "model", "pretrained", "weights_sha256", "dim", "normalized",
                "preprocess", "text_context_length", "max_seq_length")


@dataclass(frozen=True)
class Task:
    """One target: a label column and its classes (multi-label: a list-valued column)."""

    column: str
    classes: tuple[str, ...]
    multilabel: bool = False


class Head:
    """Base class: input checks, threshold tuning and the save/load hooks.

    Subclasses implement ``_fit``, ``_scores`` (probabilities per task), ``tensors`` and
    ``load_tensors``; ``params`` holds the JSON-able constructor arguments.
    """

    name = "head"

    def __init__(self, tasks: Sequence[Task], dims: Sequence[int], **params: Any) -> None:
        self.tasks = tuple(tasks)
        self.dims = tuple(int(d) for d in dims)
        self.params = params
        self.thresholds: dict[int, np.ndarray] = {}
        self.info: dict[str, Any] = {}  # what fitting found (chosen C, epochs, weights)

    def fit(self, xs: Sequence[np.ndarray], ys: Sequence[np.ndarray],
            val_xs: Sequence[np.ndarray], val_ys: Sequence[np.ndarray]) -> Head:
        xs, val_xs = self.check(xs), self.check(val_xs)
        ys = check_targets(self.tasks, ys, len(xs[0]))
        val_ys = check_targets(self.tasks, val_ys, len(val_xs[0]))
        self._fit(xs, ys, val_xs, val_ys)
        val_probs = self._scores(val_xs)
        for t, task in enumerate(self.tasks):
            if task.multilabel:
                self.thresholds[t] = best_thresholds(val_ys[t], val_probs[t])
        return self

    def predict_proba(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Class probabilities, one ``(n, n_classes)`` array per task."""
        return self._scores(self.check(xs))

    def predict(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Class indices ``(n,)`` per single-label task; 0/1 ``(n, n_classes)`` otherwise."""
        return [self.decide(t, p) for t, p in enumerate(self.predict_proba(xs))]

    def decide(self, t: int, probs: np.ndarray) -> np.ndarray:
        if self.tasks[t].multilabel:
            return (probs >= self.thresholds.get(t, 0.5)).astype(np.int8)
        return probs.argmax(axis=1)

    def check(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Inputs as float32 arrays, or ValueError on count, dimension, row or NaN trouble."""
        if len(xs) != len(self.dims):
            raise ValueError(f"{self.name} takes {len(self.dims)} input column(s), got {len(xs)}")
        out = [check_finite(x, f"input {i}") for i, x in enumerate(xs)]
        for i, (x, d) in enumerate(zip(out, self.dims, strict=True)):
            if x.shape[1] != d:
                raise ValueError(f"{self.name}: input {i} has dimension {x.shape[1]}, "
                                 f"the head expects {d}")
        if len({len(x) for x in out}) > 1:
            raise ValueError(f"inputs have different row counts: {[len(x) for x in out]}")
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
    """Targets as int64 class indices / float32 0/1 matrices, checked against ``tasks``."""
    if len(ys) != len(tasks):
        raise ValueError(f"{len(tasks)} task(s) but {len(ys)} target array(s)")
    out = []
    for task, y in zip(tasks, ys, strict=True):
        y = np.asarray(y)
        if len(y) != n:
            raise ValueError(f"{task.column}: {len(y)} targets for {n} feature rows")
        k = len(task.classes)
        if task.multilabel:
            if y.ndim != 2 or y.shape[1] != k:
                raise ValueError(f"{task.column}: multi-label targets must be (n, {k})")
            out.append(y.astype(np.float32))
        else:
            if y.ndim != 1 or (n and (y.min() < 0 or y.max() >= k)):
                raise ValueError(f"{task.column}: targets must be class indices in [0, {k})")
            out.append(y.astype(np.int64))
    return out


# ------------------------------------------------------------------------------ registry

@dataclass(frozen=True)
class HeadType:
    name: str
    cls: type[Head]
    inputs: str  # "one": a single column; "many": two or more (fusion)
    multilabel: bool  # supports multi-label and multi-task targets
    defaults: Mapping[str, Any]
    doc: str


HEADS: dict[str, HeadType] = {}


def register_head(name: str, cls: type[Head], *, inputs: str, multilabel: bool, doc: str,
                  **defaults: Any) -> None:
    """Add a head type (run-time registration: tests and plugins add their own)."""
    if inputs not in ("one", "many"):
        raise ValueError(f"inputs must be 'one' or 'many', not {inputs!r}")
    HEADS[name] = HeadType(name, cls, inputs, multilabel, dict(defaults), doc)


def make_head(name: str, tasks: Sequence[Task], dims: Sequence[int], **params: Any) -> Head:
    """A new head of registered type ``name``; ValueError if it cannot take these inputs."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; known: {sorted(HEADS)}")
    ht = HEADS[name]
    if ht.inputs == "one" and len(dims) != 1:
        raise ValueError(f"head {name!r} takes one input column, got {len(dims)}")
    if ht.inputs == "many" and len(dims) < 2:
        raise ValueError(f"fusion head {name!r} needs two or more input columns, got {len(dims)}")
    if not ht.multilabel and (len(tasks) != 1 or tasks[0].multilabel):
        raise ValueError(f"head {name!r} takes one single-label task; use linear, mlp or a "
                         f"fusion head for multi-label or multi-task targets")
    head = ht.cls(tasks, dims, **{**ht.defaults, **params})
    head.name = name
    return head


# ----------------------------------------------------------------------------- save/load

def save_head(head: Head, path: str | os.PathLike, inputs: Sequence[Mapping[str, Any]],
              extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``path.safetensors`` then ``path.json`` (last, atomically).

    ``inputs``: one entry per input column, ``{"column": name, "provenance": {...}}`` with
    the column's entry from the embed manifest; predicting checks it.
    """
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.tensors().items()}
    for t, thr in head.thresholds.items():
        tensors[f"thresholds.{t}"] = torch.from_numpy(np.asarray(thr, dtype=np.float32))
    atomic_write_bytes(path.with_suffix(".safetensors"), save_safetensors(tensors))
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "head": head.name, "params": head.params,
        "tasks": [asdict(t) for t in head.tasks], "dims": list(head.dims),
        "inputs": [{"column": i["column"],
                    "provenance": {k: i["provenance"].get(k) for k in BINDING_KEYS}}
                   for i in inputs],
        "weights": path.with_suffix(".safetensors").name, "info": head.info, **(extra or {}),
    }
    atomic_write_json(path.with_suffix(".json"), meta)
    return path.with_suffix(".json")


def load_head(path: str | os.PathLike) -> tuple[Head, dict[str, Any]]:
    """Rebuild a saved head from its JSON description and safetensors weights."""
    path = Path(path).with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"no saved head at {path}")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise FormatError(f"{path} is not a saved head of format {FORMAT} v{FORMAT_VERSION}")
    tasks = [Task(t["column"], tuple(t["classes"]), t["multilabel"]) for t in meta["tasks"]]
    head = make_head(meta["head"], tasks, meta["dims"], **meta["params"])
    tensors = load_safetensors(path.with_name(meta["weights"]).read_bytes())
    head.thresholds = {int(k.split(".")[1]): v.numpy() for k, v in tensors.items()
                       if k.startswith("thresholds.")}
    head.load_tensors({k: v for k, v in tensors.items() if not k.startswith("thresholds.")})
    head.info = meta.get("info", {})
    return head, meta


def check_inputs_match(meta: Mapping[str, Any], columns: Mapping[str, Mapping[str, Any]],
                       where: str = "this run") -> None:
    """Refuse (FormatError) shards whose columns were not made by the models the head saw."""
    for inp in meta["inputs"]:
        name, want = inp["column"], inp["provenance"]
        if name not in columns:
            raise FormatError(f"the head needs embedding column {name!r}; {where} has "
                              f"{sorted(columns)}")
        have = columns[name]
        diff = [k for k in BINDING_KEYS
                if json.dumps(want.get(k), sort_keys=True) != json.dumps(have.get(k),
                                                                         sort_keys=True)]
        if diff:
            k = diff[0]
            raise FormatError(
                f"refusing to predict: column {name!r} of {where} comes from a different model "
                f"than the head was trained on ({k}: head {want.get(k)!r}, shards "
                f"{have.get(k)!r}). Embed with the same model, or retrain the head.")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily use ``n`` intra-op threads (None: leave as is).

    Small matrices (mini-batches, the probe's sweep subsample) gain nothing from threads
    and lose a lot when other processes share the cores (measured 4x slower on 2 busy
    cores); one thread is also bitwise reproducible.
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


# Concrete heads register themselves on import.
from . import fusion, probe  # noqa: E402, F401
