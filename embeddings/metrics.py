"""Classification metrics for single-label and multi-label heads (thin scikit-learn layer)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    classification_report,
    confusion_matrix,
    f1_score,
)


def single_label(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (over the classes present in ``y_true``), per-class report and
    confusion matrix (rows: true class, columns: predicted) of integer class indices."""
    labels = np.arange(len(classes))
    present = np.unique(y_true)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        report = classification_report(y_true, y_pred, labels=labels, target_names=list(classes),
                                       output_dict=True, zero_division=0)
        macro_f1 = f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(macro_f1),
        "per_class": {c: report[c] for c in classes},
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def multi_label(y_true: np.ndarray, scores: np.ndarray, y_pred: np.ndarray,
                classes: Sequence[str]) -> dict[str, Any]:
    """mAP (mean over labels with a positive in ``y_true``), macro-F1 of the thresholded
    predictions over those labels, and per-label AP/F1."""
    y_true = y_true.astype(bool)
    present = np.flatnonzero(y_true.any(axis=0))
    ap = {classes[j]: float(average_precision_score(y_true[:, j], scores[:, j])) for j in present}
    f1 = f1_score(y_true[:, present], y_pred[:, present].astype(bool), average=None,
                  zero_division=0) if len(present) else np.zeros(0)
    return {
        "mAP": float(np.mean(list(ap.values()))) if ap else float("nan"),
        "macro_f1": float(np.mean(f1)) if len(f1) else float("nan"),
        "per_class": {classes[j]: {"ap": ap[classes[j]], "f1": float(f)}
                      for j, f in zip(present, f1, strict=True)},
        "labels_evaluated": len(present),
    }


def regression(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """RMSE, MAE and R^2 (1 - SSE / SST; NaN when the true values are constant)."""
    y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    err = y_pred - y_true
    sst = float(((y_true - y_true.mean()) ** 2).sum()) if len(y_true) else 0.0
    return {"rmse": float(np.sqrt(np.mean(err**2))) if len(err) else float("nan"),
            "mae": float(np.mean(np.abs(err))) if len(err) else float("nan"),
            "r2": 1 - float((err**2).sum()) / sst if sst > 0 else float("nan"),
            "rows": len(y_true)}


def best_thresholds(y_true: np.ndarray, scores: np.ndarray,
                    grid: np.ndarray | None = None) -> np.ndarray:
    """Per-label threshold maximising F1 on ``(y_true, scores)``; 0.5 where a label has no
    positive (nothing to tune on)."""
    grid = np.linspace(0.05, 0.95, 19) if grid is None else grid
    y = y_true.astype(bool)
    pred = scores[None, :, :] >= grid[:, None, None]  # (thresholds, rows, labels)
    tp = (pred & y).sum(axis=1)
    f1 = 2 * tp / np.maximum(pred.sum(axis=1) + y.sum(axis=0), 1)
    out = grid[np.argmax(f1, axis=0)].astype(np.float32)
    out[~y.any(axis=0)] = 0.5
    return out
