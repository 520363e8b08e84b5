"""A trained adapter: a map from one column's space into another's, applied in numpy.

Two kinds share one forward pass::

    ridge       y = x W + b
    two_layer   y = x W + b + gelu(((x - mu) / sd) W1 + b1) W2 + b2

``W, b`` of ``two_layer`` are the ridge solution (fitted first, then frozen); the
two-layer GELU branch learns what a linear map cannot, starting from zero, so training
starts at the ridge solution and early stopping keeps the better one.  GELU is the tanh
form on both sides, so the numpy forward here is the one the weights were trained with
and applying an adapter (search, serve) needs no torch.

``apply`` returns unit-length rows: the vectors of every column are compared by cosine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..store import Column

KINDS = ("ridge", "two_layer")
TENSORS = {"ridge": ("w", "b"), "two_layer": ("w", "b", "mu", "sd", "w1", "b1", "w2", "b2")}


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (``torch.nn.GELU(approximate="tanh")``)."""
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Adapter:
    """Weights of one adapter and the two columns it maps between (when bound to a run)."""

    kind: str
    tensors: dict[str, np.ndarray]
    params: dict[str, Any] = field(default_factory=dict)
    source: Column | None = None
    target: Column | None = None
    info: dict[str, Any] = field(default_factory=dict)  # validation scores, rows, seconds
    sealed: bool = False  # loaded from a description this machine sealed

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; known: {list(KINDS)}")
        missing = [k for k in TENSORS[self.kind] if k not in self.tensors]
        if missing:
            raise ValueError(f"{self.kind} adapter without tensor(s) {missing}")
        self.tensors = {k: np.asarray(v, dtype=np.float32) for k, v in self.tensors.items()}

    @property
    def d_in(self) -> int:
        return int(self.tensors["w"].shape[0])

    @property
    def d_out(self) -> int:
        return int(self.tensors["w"].shape[1])

    def raw(self, x: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """The map itself, unnormalised (what the training loss saw)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"adapter takes (n, {self.d_in}) vectors, got {x.shape}")
        t = self.tensors
        out = np.empty((len(x), self.d_out), np.float32)
        for s in range(0, len(x), chunk):
            xs = x[s:s + chunk]
            y = xs @ t["w"] + t["b"]
            if self.kind == "two_layer":
                y += gelu(((xs - t["mu"]) / t["sd"]) @ t["w1"] + t["b1"]) @ t["w2"] + t["b2"]
            out[s:s + len(xs)] = y
        return out

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Source vectors mapped into the target space, unit length, float32."""
        return unit(self.raw(x))


def scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Validation figures of a prediction of unit-length targets: MSE per coordinate and
    mean cosine (a zero row has cosine 0)."""
    pred = np.asarray(pred, np.float32)
    target = unit(target)
    mse = float(np.mean((pred - target) ** 2)) if pred.size else float("nan")
    norms = np.linalg.norm(pred, axis=1)
    cos = np.einsum("ij,ij->i", pred, target) / np.maximum(norms, 1e-12)
    return {"mse": mse, "cosine": float(cos.mean()) if len(cos) else float("nan")}


def baselines(x_val: np.ndarray, y_val: np.ndarray,
              y_train_mean: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """What an adapter must beat: ``zero`` (predict nothing), ``mean`` (the training
    targets' mean, the best constant) and ``identity`` (the source vector itself, only
    when both spaces have one width: e.g. a CLIP text tower against its image tower)."""
    out = {"zero": scores(np.zeros_like(y_val, dtype=np.float32), y_val)}
    if y_train_mean is not None:
        out["mean"] = scores(np.broadcast_to(y_train_mean, y_val.shape), y_val)
    if x_val.shape[1] == y_val.shape[1]:
        out["identity"] = scores(unit(x_val), y_val)
    return out

