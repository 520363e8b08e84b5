"""Heads stage: train and compare classification heads on a run's cached embeddings.

Reads ``RUN/embed`` (no model runs, except the CLIP text tower for zero-shot prompts) and
writes ``RUN/heads``::

    splits.json                     only when the split was made here (no split column)
    models/<head>.safetensors|.json every trained head, bound to the embed manifest
    comparison.csv, comparison.png the table and a bar chart of the chosen metric
    confusion.png                   confusion matrix of the best single-label head
    comparison.json                 written last: rows, per-class reports, the best head

Everything is checked (labels, splits, finite features) before anything is trained, and
everything is written at the end through atomic renames, so a failure leaves no
half-written output.  ``run_predict`` applies a saved head to another run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embeddings import metrics, shards
from embeddings.encoders import encoder_for_column
from embeddings.features import caption_means, check_finite
from embeddings.heads import HEADS, Task, check_inputs_match, load_head, make_head, save_head

from . import heads_report
from .config import checked_section

log = logging.getLogger(__name__)
STAGE = "heads"
SPLITS = ("train", "val", "test")
METRICS = ("accuracy", "macro_f1")


@dataclass(frozen=True)
class HeadsConfig:
    """The ``[heads]`` section (``run`` defaults to the config's top-level ``out``)."""

    run: str = "runs/demo"
    label: str = "label"  # single-label target column of the image rows
    inputs: tuple[str, ...] = ("clip_image", "clip_text", "minilm_text")
    heads: tuple[str, ...] = ("zeroshot", "logistic", "linear", "mlp", "concat", "sum",
                              "sum_mlp", "product", "gated", "late", "late_avg")
    multilabel: str = "labels"  # list-valued target column ("" = none)
    multilabel_heads: tuple[str, ...] = ("mlp", "concat")
    multitask: tuple[str, ...] = ("label", "labels")  # columns sharing one trunk (() = none)
    multitask_head: str = "gated"
    metric: str = "macro_f1"  # accuracy | macro_f1: picks the best head, drawn in the chart
    seed: int = 0
    val_fraction: float = 0.15  # used only when splits must be made here
    test_fraction: float = 0.15
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per-head overrides


def heads_config(raw: Mapping[str, Any], **overrides: Any) -> HeadsConfig:
    """Config from a parsed TOML dict plus CLI overrides (``None`` values are ignored)."""
    section = dict(checked_section(HeadsConfig, dict(raw.get("heads", {})), "heads"))
    section.setdefault("run", raw.get("out", HeadsConfig.run))
    section.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("inputs", "heads", "multilabel_heads", "multitask"):
        if key in section:
            section[key] = tuple(section[key])
    cfg = HeadsConfig(**section)
    names = set(cfg.heads) | set(cfg.multilabel_heads) | set(cfg.params)
    names |= {cfg.multitask_head} if cfg.multitask else set()
    unknown = sorted(names - set(HEADS))
    if unknown:
        raise ValueError(f"unknown head(s) {unknown}; known: {sorted(HEADS)}")
    if cfg.metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, not {cfg.metric!r}")
    if not cfg.inputs:
        raise ValueError("[heads] inputs is empty: name the embedding columns to train on")
    if not 0 < cfg.val_fraction < 1 or not 0 < cfg.test_fraction < 1 - cfg.val_fraction:
        raise ValueError("val_fraction and test_fraction must be in (0, 1) and sum below 1")
    return cfg


# ------------------------------------------------------------------------------ features

@dataclass
class Features:
    """Image-level features of a run: one array per column, with a row mask per column."""

    ids: list[str]
    table: pa.Table  # image metadata (id, split, label, labels)
    arrays: dict[str, np.ndarray]
    present: dict[str, np.ndarray]  # False: the image has no caption for a text column
    columns: dict[str, dict[str, Any]]  # provenance from the embed manifest


def load_features(run: str | Path, columns: Sequence[str]) -> Features:
    """Read ``columns`` of ``run`` as image-level arrays (text: mean of the captions)."""
    manifest = shards.read_manifest(run)
    table = shards.read_table(run, "images", ["id", "split", "label", "labels"])
    ids = table.column("id").to_pylist()
    arrays, present = {}, {}
    owners: list[str] | None = None  # image id of each caption row, read once
    for col in columns:
        info = shards.column_info(manifest, col)
        vectors = check_finite(shards.read_vectors(run, col), f"embedding column {col!r}")
        if info["kind"] == "images":
            arrays[col], present[col] = vectors, np.ones(len(ids), dtype=bool)
        else:
            if owners is None:
                owners = shards.read_table(run, "captions", ["image_id"]).column(0).to_pylist()
            arrays[col], present[col] = caption_means(ids, owners, vectors)
    return Features(ids, table, arrays, present,
                    {c: shards.column_info(manifest, c) for c in columns})


# ------------------------------------------------------------------------ targets, splits

def single_targets(table: pa.Table, column: str) -> tuple[np.ndarray, list[str | None]]:
    """Values of a single-label column (None where missing) and a has-label mask."""
    _require_column(table, column)
    if pa.types.is_list(table.schema.field(column).type):
        raise ValueError(f"label column {column!r} is list-valued: use it as `multilabel`")
    values = [v if v not in (None, "") else None for v in table.column(column).to_pylist()]
    if all(v is None for v in values):
        raise ValueError(f"label column {column!r} is empty: no image has a label")
    return np.array([v is not None for v in values]), values


def multi_targets(table: pa.Table, column: str) -> tuple[np.ndarray, list[list[str]]]:
    _require_column(table, column)
    if not pa.types.is_list(table.schema.field(column).type):
        raise ValueError(f"multi-label column {column!r} must be list-valued")
    values = [[v for v in (vs or []) if v] for vs in table.column(column).to_pylist()]
    if not any(values):
        raise ValueError(f"label column {column!r} is empty: no image has a label")
    return np.array([bool(v) for v in values]), values


def _require_column(table: pa.Table, column: str) -> None:
    if column not in table.column_names:
        raise ValueError(f"label column {column!r} not found; image rows have "
                         f"{table.column_names}")


def make_splits(run: Path, ids: list[str], labels: list[str | None], split_col: list[str | None],
                cfg: HeadsConfig) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Split name per image from the split column; missing val/test rows (or a missing
    column) are carved from train, stratified by label, once: a recorded split is reused.

    Returns the splits and, when made here, the record to write to ``splits.json``.
    """
    path = run / STAGE / "splits.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("ids_hash") == _ids_hash(ids):
            return np.array([saved["assign"][i] for i in ids]), None
    split = np.array([s if s in SPLITS else ("val" if s == "validation" else "")
                      for s in (v or "" for v in split_col)], dtype=object)
    missing = [s for s in SPLITS if not (split == s).any()]
    if not missing:
        return split, None
    split[split == ""] = "train"
    rng = np.random.default_rng(cfg.seed)
    fractions = {"val": cfg.val_fraction, "test": cfg.test_fraction}
    pool = np.flatnonzero(split == "train")
    by_class: dict[str | None, list[int]] = {}
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


# ------------------------------------------------------------------------------ planning

@dataclass(frozen=True)
class Job:
    head: str
    inputs: tuple[str, ...]
    targets: tuple[str, ...]
    display: str


def plan(cfg: HeadsConfig, columns: Mapping[str, Mapping[str, Any]]) -> list[Job]:
    """The heads to train: single-input heads once per column, fusions over all columns."""
    def expand(name: str, targets: tuple[str, ...], display: str) -> list[Job]:
        if HEADS[name].needs_text_tower:
            towers = [c for c in cfg.inputs if columns[c]["kind"] == "images"
                      and f"{columns[c]['encoder']}_text" in columns]
            if not towers:
                raise ValueError(f"{name} needs an image column among inputs whose model "
                                 "also has a text tower (CLIP)")
            return [Job(name, (c,), targets, display) for c in towers]
        if HEADS[name].inputs == "one":
            return [Job(name, (c,), targets, display) for c in cfg.inputs]
        if len(cfg.inputs) < 2:
            raise ValueError(f"fusion head {name!r} needs two or more inputs, got {cfg.inputs}")
        return [Job(name, cfg.inputs, targets, display)]

    jobs = [j for h in cfg.heads for j in expand(h, (cfg.label,), h)]
    if cfg.multilabel:
        jobs += [j for h in cfg.multilabel_heads for j in expand(h, (cfg.multilabel,), h)]
    if cfg.multitask:
        name = cfg.multitask_head
        jobs += expand(name, tuple(cfg.multitask), f"{name} (multi-task)")
    return jobs


# ----------------------------------------------------------------------------- the stage

@dataclass
class HeadsResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any]
    table: str
    notes: list[str]
    seconds: float


def run_heads(cfg: HeadsConfig) -> HeadsResult:
    """Train, evaluate and save every head of ``cfg`` on the run ``cfg.run``."""
    t0 = time.perf_counter()
    run = Path(cfg.run)
    manifest = shards.read_manifest(run)
    for c in cfg.inputs:
        shards.column_info(manifest, c)
    jobs = plan(cfg, manifest["columns"])
    feats = load_features(run, cfg.inputs)
    _, labels = single_targets(feats.table, cfg.label)
    split, split_record = make_splits(run, feats.ids, labels,
                                      feats.table.column("split").to_pylist(), cfg)
    targets = _targets(cfg, feats, jobs, split)
    notes = [n for t in targets.values() for n in t["notes"]]

    rows, saved = [], []
    for job in jobs:
        row_set, head, meta = _train(job, cfg, feats, targets, split, manifest)
        log.debug("trained %s on %s in %.2f s", job.display, job.inputs, row_set[0]["train_s"])
        rows += row_set
        saved.append((job, head, meta))
    single = [r for r in rows if r["multilabel"] is False]
    best = max(single or rows, key=lambda r: (np.nan_to_num(r[cfg.metric], nan=-1),
                                              -r["train_s"]))
    table = heads_report.format_table(rows)
    _write(run, cfg, rows, best, saved, split_record, table, notes)
    return HeadsResult(run, rows, best, table, notes, time.perf_counter() - t0)


def _targets(cfg: HeadsConfig, feats: Features, jobs: list[Job],
             split: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per target column: Task, encoded targets, the rows that have a label, notes."""
    out = {}
    for col in sorted({c for j in jobs for c in j.targets}):
        _require_column(feats.table, col)
        multilabel = pa.types.is_list(feats.table.schema.field(col).type)
        notes = []
        if multilabel:
            has, values = multi_targets(feats.table, col)
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
            has, values = single_targets(feats.table, col)
            classes = sorted({values[i] for i in np.flatnonzero(has & (split == "train"))})
            unseen = sorted({values[i] for i in np.flatnonzero(has & (split != "train"))}
                            - set(classes))
            if unseen:
                raise ValueError(f"class(es) {unseen} of {col!r} appear in val/test but have "
                                 f"no training rows: cannot learn them (fix the split)")
            index = {c: j for j, c in enumerate(classes)}
            y = np.array([index.get(v, -1) for v in values], dtype=np.int64)
            for s in ("val", "test"):
                absent = sorted(set(classes) - {values[i] for i in
                                                np.flatnonzero(has & (split == s))})
                if absent:
                    notes.append(f"{col}: {len(absent)} class(es) absent from {s}: {absent[:5]}")
        if len(classes) < 2:
            raise ValueError(f"label column {col!r} has a single class {classes} in train: "
                             f"nothing to classify")
        for s in ("train", "val"):
            if not (has & (split == s)).any():
                raise ValueError(f"no labelled {s} rows for {col!r}")
        missing = int((~has).sum())
        if missing:
            notes.append(f"{col}: {missing} image(s) without a label are left out")
        out[col] = {"task": Task(col, tuple(classes), multilabel), "y": y, "has": has,
                    "notes": notes}
    return out


def _train(job: Job, cfg: HeadsConfig, feats: Features, targets: Mapping[str, Any],
           split: np.ndarray, manifest: Mapping[str, Any]) -> tuple[list[dict], Any, dict]:
    keep = np.logical_and.reduce([feats.present[c] for c in job.inputs]
                                 + [targets[t]["has"] for t in job.targets])
    dropped = int(np.logical_and.reduce([targets[t]["has"] for t in job.targets]).sum()
                  - keep.sum())
    rows = {s: np.flatnonzero(keep & (split == s)) for s in SPLITS}
    tasks = [targets[t]["task"] for t in job.targets]
    xs = {s: [feats.arrays[c][r] for c in job.inputs] for s, r in rows.items()}
    ys = {s: [targets[t]["y"][r] for t in job.targets] for s, r in rows.items()}
    head = make_head(job.head, tasks, [feats.arrays[c].shape[1] for c in job.inputs],
                     **dict(cfg.params.get(job.head, {})), **_seed(job.head, cfg.seed))
    if HEADS[job.head].needs_text_tower:
        text_col = f"{feats.columns[job.inputs[0]]['encoder']}_text"
        head.text_encoder = encoder_for_column(shards.column_info(manifest, text_col))
    t = time.perf_counter()
    head.fit(xs["train"], ys["train"], xs["val"], ys["val"])
    seconds = time.perf_counter() - t
    eval_split = "test" if len(rows["test"]) else "val"
    probs = head.predict_proba(xs[eval_split])
    out = []
    for ti, task in enumerate(tasks):
        y = ys[eval_split][ti]
        pred = head.decide(ti, probs[ti])
        if task.multilabel:
            m = metrics.multi_label(y, probs[ti], pred, task.classes)
            acc, f1, ap = float("nan"), m["macro_f1"], m["mAP"]
        else:
            m = metrics.single_label(y, pred, task.classes)
            acc, f1, ap = m["accuracy"], m["macro_f1"], float("nan")
        note = f"{dropped} image(s) without captions left out" if dropped else ""
        out.append({"head": job.display, "inputs": "+".join(job.inputs),
                    "target": task.column + (" (multi-label)" if task.multilabel else ""),
                    "accuracy": acc, "macro_f1": f1, "mAP": ap, "train_s": round(seconds, 3),
                    "rows": len(rows["train"]), "multilabel": task.multilabel,
                    "eval_split": eval_split, "model": f"models/{_slug(job)}.json",
                    "notes": note, "info": head.info, "report": m})
    meta = {"trained_on": {"run": str(Path(cfg.run).resolve()), "label_columns": job.targets,
                           "rows": {s: len(r) for s, r in rows.items()}},
            "test_metrics": {r["target"]: {k: r[k] for k in ("accuracy", "macro_f1", "mAP")}
                             for r in out}}
    return out, head, meta


def _seed(name: str, seed: int) -> dict[str, int]:
    defaults = HEADS[name].defaults
    return {"seed": seed} if "seed" in defaults else {}


def _slug(job: Job) -> str:
    text = f"{job.head}-{'+'.join(job.inputs)}-{'+'.join(job.targets)}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def _write(run: Path, cfg: HeadsConfig, rows: list[dict], best: dict, saved: list,
           split_record: dict | None, table: str, notes: list[str]) -> None:
    base = run / STAGE
    columns = shards.read_manifest(run)["columns"]
    if split_record is not None:
        shards.atomic_write_json(base / "splits.json", split_record)
    for job, head, meta in saved:
        inputs = [{"column": c, "provenance": columns[c]} for c in job.inputs]
        save_head(head, base / "models" / _slug(job), inputs, meta)
    shards.atomic_write_bytes(base / "comparison.csv", heads_report.csv_bytes(rows))
    title = f"{cfg.metric} on the {best['eval_split']} split, {run.name}"
    shards.atomic_write_bytes(base / "comparison.png",
                              heads_report.bar_chart(rows, cfg.metric, title))
    if not best["multilabel"]:
        classes = list(best["report"]["per_class"])
        shards.atomic_write_bytes(base / "confusion.png", heads_report.confusion_plot(
            best["report"]["confusion"], classes,
            f"{best['head']} [{best['inputs']}], {best['eval_split']} split"))
    public = [{k: v for k, v in r.items() if k != "report"} for r in rows]
    shards.atomic_write_json(base / "comparison.json", _jsonable({
        "config": asdict(replace(cfg, params=dict(cfg.params))), "metric": cfg.metric,
        "rows": public, "best": {k: v for k, v in best.items() if k != "report"},
        "reports": {f"{r['head']} [{r['inputs']}] -> {r['target']}": r["report"] for r in rows},
        "notes": notes, "table": table}))


def _jsonable(obj: Any) -> Any:
    """NaN -> None (strict JSON), tuples -> lists, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return None if np.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ------------------------------------------------------------------------------- predict

@dataclass
class PredictResult:
    path: Path
    rows: int
    dropped: int


def run_predict(head_path: str | Path, run: str | Path, out: str | Path | None = None
                ) -> PredictResult:
    """Predict with a saved head on the shards of ``run``; write Parquet (atomically):
    ``id``, then per task the predicted label(s) and ``<column>_proba`` (class order in
    the file metadata)."""
    head, meta = load_head(head_path)
    manifest = shards.read_manifest(run)
    check_inputs_match(meta, manifest["columns"], where=f"run {run}")
    columns = [i["column"] for i in meta["inputs"]]
    feats = load_features(run, columns)
    keep = np.logical_and.reduce([feats.present[c] for c in columns])
    probs = head.predict_proba([feats.arrays[c][keep] for c in columns])
    ids = [i for i, k in zip(feats.ids, keep, strict=True) if k]
    arrays, names = [pa.array(ids, pa.string())], ["id"]
    for t, task in enumerate(head.tasks):
        decided = head.decide(t, probs[t])
        classes = np.array(task.classes, dtype=object)
        if task.multilabel:
            arrays.append(pa.array([classes[row.astype(bool)].tolist() for row in decided],
                                   pa.list_(pa.string())))
        else:
            arrays.append(pa.array(classes[decided].tolist(), pa.string()))
        flat = pa.array(probs[t].astype(np.float32).reshape(-1), pa.float32())
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, len(task.classes)))
        names += [task.column, f"{task.column}_proba"]
    table = pa.Table.from_arrays(arrays, names=names).replace_schema_metadata({
        b"embeddings.head": (Path(head_path).with_suffix(".json").name).encode(),
        b"classes": json.dumps({t.column: list(t.classes) for t in head.tasks}).encode()})
    path = Path(out) if out else Path(run) / STAGE / "predictions" / (
        Path(head_path).with_suffix("").name + ".parquet")
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    shards.atomic_write_bytes(path, buf.getvalue())
    return PredictResult(path, len(ids), int((~keep).sum()))
