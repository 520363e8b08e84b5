"""Targets, splits and rows of the heads stage: label columns -> tasks and encoded
targets (single-label, multi-label, regression), the train/val/test assignment (from the
data's split column, else made here once), and :func:`job_rows`, the one place that
decides which rows a head trains and is scored on."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embeddings.errors import InputError
from embeddings.heads import Task
from embeddings.store import Run

from .config import HeadsConfig
from .features import Features

SPLITS = ("train", "val", "test")


def single_targets(table: pa.Table, column: str) -> tuple[np.ndarray, list[str | None]]:
    """Values of a single-label column (None where missing) and a has-label mask."""
    _require_column(table, column)
    if pa.types.is_list(table.schema.field(column).type):
        raise InputError(f"label column {column!r} is list-valued: use it as `multilabel`")
    values = [None if v in (None, "") else str(v) for v in table.column(column).to_pylist()]
    if all(v is None for v in values):
        raise InputError(f"label column {column!r} is empty: no image has a label")
    return np.array([v is not None for v in values]), values


def is_numeric(table: pa.Table, column: str) -> bool:
    """A floating-point column: a regression target unless told otherwise."""
    _require_column(table, column)
    return pa.types.is_floating(table.schema.field(column).type)


def numeric_targets(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Values of a numeric column as float64 (NaN where missing) and a has-value mask."""
    _require_column(table, column)
    kind = table.schema.field(column).type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        raise InputError(f"regression target {column!r} must be numeric, not {kind}")
    values = np.array([np.nan if v is None else v for v in table.column(column).to_pylist()],
                      dtype=np.float64)
    has = np.isfinite(values)
    if not has.any():
        raise InputError(f"label column {column!r} is empty: no image has a value")
    return has, values


def strata(values: Sequence[Any], regression: bool, bins: int = 10) -> list[Any]:
    """What splits are stratified by: the class, or a regression target's decile."""
    if not regression:
        return list(values)
    v = np.asarray(values, dtype=np.float64)
    edges = np.nanquantile(v, np.linspace(0, 1, bins + 1)[1:-1]) if np.isfinite(v).any() else []
    return [None if not np.isfinite(x) else int(np.searchsorted(edges, x)) for x in v]


def multi_targets(table: pa.Table, column: str) -> tuple[np.ndarray, list[list[str]]]:
    _require_column(table, column)
    if not pa.types.is_list(table.schema.field(column).type):
        raise InputError(f"multi-label column {column!r} must be list-valued")
    values = [[v for v in (vs or []) if v] for vs in table.column(column).to_pylist()]
    if not any(values):
        raise InputError(f"label column {column!r} is empty: no image has a label")
    return np.array([bool(v) for v in values]), values


def _require_column(table: pa.Table, column: str) -> None:
    if column not in table.column_names:
        raise InputError(f"label column {column!r} not found; image rows have "
                         f"{table.column_names}")


def make_splits(run: str | Path, ids: list[str], labels: Sequence[Any],
                split_col: list[str | None],
                cfg: HeadsConfig) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Split name per image from the split column; missing val/test rows (or a missing
    column) are carved from train, stratified by label, once: a recorded split is reused.

    Returns the splits and, when made here, the record to write to ``splits.json``.
    """
    saved = Run(run).heads.read_splits()
    if saved is not None and saved.get("ids_hash") == _ids_hash(ids):
        assign = saved.get("assign")
        if isinstance(assign, dict) and all(assign.get(i) in SPLITS for i in ids):
            return np.array([assign[i] for i in ids]), None
    split = np.array([s if s in SPLITS else ("val" if s == "validation" else "")
                      for s in (v or "" for v in split_col)], dtype=object)
    missing = [s for s in SPLITS if not (split == s).any()]
    if not missing:
        return split, None
    split[split == ""] = "train"
    rng = np.random.default_rng(cfg.seed)
    fractions = {"val": cfg.val_fraction, "test": cfg.test_fraction}
    pool = np.flatnonzero(split == "train")
    by_class: dict[Any, list[int]] = {}
    for i in pool:
        by_class.setdefault(labels[i], []).append(int(i))
    for members in by_class.values():
        members = list(rng.permutation(members))
        for s in ("test", "val"):
            if s in missing:
                take = min(round(fractions[s] * len(members) + 1e-9), len(members) - 1)
                for i in members[:take]:
                    split[i] = s
                members = members[take:]
    record = {"made_for": missing, "seed": cfg.seed, "fractions": fractions,
              "stratified_by": cfg.label, "ids_hash": _ids_hash(ids),
              "assign": dict(zip(ids, split.tolist(), strict=True))}
    return split, record


def _ids_hash(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def targets(columns: Iterable[str], table: pa.Table, split: np.ndarray,
            regression: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Per target column: Task, encoded targets, the rows that have a label, notes.
    Columns in ``regression`` are numeric targets."""
    out = {}
    regression = set(regression)
    for col in sorted(set(columns)):
        _require_column(table, col)
        multilabel = pa.types.is_list(table.schema.field(col).type)
        notes: list[str] = []
        if col in regression:
            has, y = numeric_targets(table, col)
            for s in ("train", "val"):
                if not (has & (split == s)).any():
                    raise InputError(f"no labelled {s} rows for {col!r}")
            if np.ptp(y[has & (split == "train")]) == 0:
                raise InputError(f"regression target {col!r} is constant on the train rows: "
                                 f"nothing to learn")
            missing = int((~has).sum())
            if missing:
                notes.append(f"{col}: {missing} image(s) without a value are left out")
            out[col] = {"task": Task(col, (), regression=True), "y": np.nan_to_num(y),
                        "has": has, "notes": notes}
            continue
        if multilabel:
            has, values = multi_targets(table, col)
            classes = sorted({v for i in np.flatnonzero(has & (split == "train"))
                              for v in values[i]})
            unseen = sorted({v for vs in values for v in vs} - set(classes))
            if unseen:
                notes.append(f"{col}: {len(unseen)} label(s) never seen in train are not "
                             f"predicted: {unseen[:5]}{' ...' if len(unseen) > 5 else ''}")
            index = {c: j for j, c in enumerate(classes)}
            y = np.zeros((len(values), len(classes)), dtype=np.float32)
            for i, vs in enumerate(values):
                y[i, [index[v] for v in vs if v in index]] = 1
        else:
            has, values = single_targets(table, col)
            classes = sorted({values[i] for i in np.flatnonzero(has & (split == "train"))})
            unseen = sorted({values[i] for i in np.flatnonzero(has & (split != "train"))}
                            - set(classes))
            if unseen:
                raise InputError(f"class(es) {unseen} of {col!r} appear in val/test but have "
                                 f"no training rows: cannot learn them (fix the split)")
            index = {c: j for j, c in enumerate(classes)}
            y = np.array([index.get(v, -1) for v in values], dtype=np.int64)
            for s in ("val", "test"):
                absent = sorted(set(classes) - {values[i] for i in
                                                np.flatnonzero(has & (split == s))})
                if absent:
                    notes.append(f"{col}: {len(absent)} class(es) absent from {s}: {absent[:5]}")
        if len(classes) < 2:
            raise InputError(f"label column {col!r} has a single class {classes} in train: "
                             f"nothing to classify")
        for s in ("train", "val"):
            if not (has & (split == s)).any():
                raise InputError(f"no labelled {s} rows for {col!r}")
        missing = int((~has).sum())
        if missing:
            notes.append(f"{col}: {missing} image(s) without a label are left out")
        out[col] = {"task": Task(col, tuple(classes), multilabel), "y": y, "has": has,
                    "notes": notes}
    return out


def job_rows(inputs: Sequence[str], columns: Sequence[str], feats: Features,
             tgts: Mapping[str, Mapping[str, Any]], split: np.ndarray,
             allowed: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], int]:
    """The rows a head on ``inputs`` -> ``columns`` uses, per split (only ``allowed`` rows:
    the dedup keep-list), and how many labelled rows were left out for a missing input (an
    image without captions).  Every row filter of the stage belongs here."""
    labelled = np.logical_and.reduce([tgts[t]["has"] for t in columns])
    keep = np.logical_and.reduce([feats.present[c] for c in inputs] + [labelled])
    dropped = int(labelled.sum() - keep.sum())
    if allowed is not None:
        keep &= allowed
    return {s: np.flatnonzero(keep & (split == s)) for s in SPLITS}, dropped
