"""Heads stage: train and compare classification heads on a run's cached embeddings.

Reads ``RUN/embed`` (no model runs, except a text tower for heads that declare they need
one, like zero-shot) and writes ``RUN/heads`` under its lock: every trained head (bound
to the embed provenance of its inputs), the comparison table (CSV, JSON, bar chart) and
the best head's confusion matrix.  Everything is checked (labels, splits, finite
features) before anything is trained and written at the end through atomic renames.
Roles: :mod:`.features` (arrays), :mod:`.labels` (a label side file joined by id),
:mod:`.targets` (tasks, splits, the rows of each head), this module (plan, train,
compare), :mod:`.heads_report` (table, plots), :mod:`.predict` (apply a head).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from embeddings import metrics
from embeddings.encoders import encoder_for_column
from embeddings.errors import InputError, RunMismatch, UserError
from embeddings.heads import HEADS, Head, head_type, make_head, save_head
from embeddings.store import Column, Run, atomic_write_bytes, atomic_write_json, column_name

from . import heads_report
from .config import HeadsConfig
from .features import Features, load_features
from .labels import LabelFile, join_labels, read_label_file
from .leaks import describe, kept_mask, leak_counts, leak_mask
from .targets import (
    is_numeric,
    job_rows,
    make_splits,
    numeric_targets,
    single_targets,
    strata,
    targets,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    head: str
    inputs: tuple[str, ...]
    targets: tuple[str, ...]
    display: str

    @property
    def slug(self) -> str:
        text = f"{self.head}-{'+'.join(self.inputs)}-{'+'.join(self.targets)}"
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


@dataclass(frozen=True)
class Row:
    """One line of the comparison: a head on some inputs, scored on one target."""

    head: str
    inputs: str
    target: str
    accuracy: float
    macro_f1: float
    mAP: float
    rmse: float
    r2: float
    train_s: float
    rows: int
    multilabel: bool
    regression: bool
    eval_split: str
    model: str
    notes: str
    info: dict[str, Any]
    report: dict[str, Any]
    with_leaks: dict[str, float] | None = field(default=None)  # --exclude-leaks: the metrics
    # on every evaluation row (the fields above are then without the leaked rows)

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "report"}


def plan(cfg: HeadsConfig, columns: Mapping[str, Column], label_numeric: bool) -> list[Job]:
    """The heads to train: single-input heads once per column, fusions over all columns;
    for a regression target only the heads that do regression."""
    def expand(name: str, targets: tuple[str, ...], display: str) -> list[Job]:
        if HEADS[name].needs_text_tower:
            towers = [c for c in cfg.inputs if columns[c].kind == "images"
                      and column_name(columns[c].encoder, "text") in columns]
            if not towers:
                raise InputError(f"{name} needs an image column among inputs whose model "
                                 "also has a text tower (CLIP)")
            return [Job(name, (c,), targets, display) for c in towers]
        if HEADS[name].inputs == "one":
            return [Job(name, (c,), targets, display) for c in cfg.inputs]
        if len(cfg.inputs) < 2:
            raise InputError(f"fusion head {name!r} needs two or more inputs, got {cfg.inputs}")
        return [Job(name, cfg.inputs, targets, display)]

    regression = cfg.task == "regression" or (cfg.task == "auto" and label_numeric)
    main = [h for h in cfg.heads if not regression or HEADS[h].regression]
    jobs = [j for h in main for j in expand(h, (cfg.label,), h)]
    if cfg.multilabel:
        jobs += [j for h in cfg.multilabel_heads for j in expand(h, (cfg.multilabel,), h)]
    if cfg.multitask:
        name = cfg.multitask_head
        jobs += expand(name, tuple(cfg.multitask), f"{name} (multi-task)")
    return jobs


def check_config(cfg: HeadsConfig) -> None:
    """Head names, every head's parameters and the fractions, before anything is read."""
    names = set(cfg.heads) | set(cfg.multilabel_heads) | set(cfg.params)
    names |= {cfg.multitask_head} if cfg.multitask else set()
    unknown = sorted(names - set(HEADS))
    if unknown:
        raise InputError(f"unknown head(s) {unknown}; known: {sorted(HEADS)}")
    for name, values in cfg.params.items():
        head_type(name).params(values)
    if not cfg.inputs:
        raise InputError("[heads] inputs is empty: name the embedding columns to train on")
    if not 0 < cfg.val_fraction < 1 or not 0 < cfg.test_fraction < 1 - cfg.val_fraction:
        raise InputError("val_fraction and test_fraction must be in (0, 1) and sum below 1")


def head_params(cfg: HeadsConfig, name: str) -> dict[str, Any]:
    """``[heads.params.<name>]`` over ``[heads] seed`` (for heads that take a seed)."""
    seed = {"seed": cfg.seed} if hasattr(HEADS[name].defaults, "seed") else {}
    return {**seed, **cfg.params.get(name, {})}


@dataclass
class HeadsResult:
    run_dir: Path
    rows: list[Row]
    best: Row
    metric: str  # what picked the best row
    table: str
    notes: list[str]
    seconds: float


def run_heads(cfg: HeadsConfig) -> HeadsResult:
    """Train, evaluate and save every head of ``cfg`` on the run ``cfg.run``."""
    t0 = time.perf_counter()
    check_config(cfg)
    run = Run(cfg.run)
    manifest = run.embed.manifest()
    for c in cfg.inputs:
        manifest.column(c)
    label_file = (read_label_file(cfg.labels_file, [cfg.multilabel] if cfg.multilabel else [])
                  if cfg.labels_file else None)
    with run.lock("heads"):
        feats = load_features(run.path, cfg.inputs, cfg.memory_budget_gb)
        _say(feats.streamed, f"{len(feats.ids)} images' features stream from "
             f"{run.heads.cache.dir} (beyond the memory budget) after "
             f"{time.perf_counter() - t0:.0f} s")
        notes: list[str] = []
        if label_file is not None:
            table, notes = join_labels(feats.table, label_file)
            feats = replace(feats, table=table)
        regression = _regression_columns(cfg, feats)
        jobs = plan(cfg, manifest.columns, cfg.label in regression)
        skipped = [h for h in cfg.heads if cfg.label in regression and not HEADS[h].regression]
        if skipped:
            notes.append(f"{cfg.label} is a regression target: {skipped} only classify, "
                         f"not trained")
        values = (numeric_targets(feats.table, cfg.label)[1] if cfg.label in regression
                  else single_targets(feats.table, cfg.label)[1])
        split, split_record = make_splits(run.path, feats.ids,
                                          strata(values, cfg.label in regression),
                                          feats.table.column("split").to_pylist(), cfg)
        tgts = targets({c for j in jobs for c in j.targets}, feats.table, split, regression)
        notes += [n for t in tgts.values() for n in t["notes"]]
        leak = _leaks(run, split, cfg, notes)
        allowed = kept_mask(run, len(split)) if cfg.dedup else None
        if allowed is not None:
            notes.append(f"--dedup: {int(allowed.sum())} of {len(allowed)} images kept "
                         "(the dedup keep-list)")
        rows, saved = [], []
        for job in jobs:
            row_set, head, meta = _train(job, cfg, feats, tgts, split, manifest.columns,
                                         label_file, allowed,
                                         leak if cfg.exclude_leaks else None)
            log.debug("trained %s on %s in %.2f s", job.display, job.inputs, row_set[0].train_s)
            _say(feats.streamed, f"{job.display} on {'+'.join(job.inputs)} trained in "
                 f"{row_set[0].train_s:.0f} s")
            rows += row_set
            saved.append((job, head, meta))
        metric = "r2" if cfg.label in regression else cfg.metric
        ranked = [r for r in rows if (r.regression if metric == "r2"
                                      else not (r.multilabel or r.regression))] or rows
        best = max(ranked, key=lambda r: (np.nan_to_num(getattr(r, metric), nan=-np.inf),
                                          -r.train_s))
        table = heads_report.format_table(rows)
        _write(run, cfg, rows, best, metric, saved, split_record, table, notes,
               manifest.columns)
    return HeadsResult(run.path, rows, best, metric, table, notes, time.perf_counter() - t0)


def _say(streamed: bool, text: str) -> None:
    """A progress line on stderr for runs large enough to stream (minutes per head)."""
    if streamed:
        print(f"heads: {text}", file=sys.stderr, flush=True)


def _regression_columns(cfg: HeadsConfig, feats: Features) -> set[str]:
    """Target columns trained as regression: ``label`` if ``task`` says so (or, ``auto``,
    if it is floating-point), and floating-point multi-task columns."""
    out = {c for c in cfg.multitask if c in feats.table.column_names
           and is_numeric(feats.table, c)}
    if cfg.task == "regression" or (cfg.task == "auto" and is_numeric(feats.table, cfg.label)):
        out.add(cfg.label)
    else:
        out.discard(cfg.label)
    return out


def _leaks(run: Run, split: np.ndarray, cfg: HeadsConfig, notes: list[str]
           ) -> np.ndarray | None:
    """Evaluation rows with a near-duplicate in train (counted in the notes)."""
    try:
        leak = leak_mask(run, split)
    except RunMismatch as e:
        if cfg.exclude_leaks:
            raise
        notes.append(f"leaks not counted: {e}")
        return None
    if leak is None:
        if cfg.exclude_leaks:
            raise InputError(f"--exclude-leaks needs a dedup report: run `python -m pipeline "
                             f"dedup --run {run.path}` first")
        return None
    notes.append(describe(leak_counts(leak, split), cfg.exclude_leaks))
    return leak


def _scores(task: Any, y: np.ndarray, prob: np.ndarray, pred: np.ndarray
            ) -> tuple[dict[str, float], dict[str, Any]]:
    """The table's metrics of one task (NaN where one does not apply) and its report."""
    nan = float("nan")
    out = {"accuracy": nan, "macro_f1": nan, "mAP": nan, "rmse": nan, "r2": nan}
    if task.regression:
        m = metrics.regression(y, pred)
        out.update(rmse=m["rmse"], r2=m["r2"])
    elif task.multilabel:
        m = metrics.multi_label(y, prob, pred, task.classes)
        out.update(macro_f1=m["macro_f1"], mAP=m["mAP"])
    else:
        m = metrics.single_label(y, pred, task.classes)
        out.update(accuracy=m["accuracy"], macro_f1=m["macro_f1"])
    return out, m


def _train(job: Job, cfg: HeadsConfig, feats: Features, tgts: Mapping[str, Any],
           split: np.ndarray, columns: Mapping[str, Column], label_file: LabelFile | None,
           allowed: np.ndarray | None = None, leak: np.ndarray | None = None
           ) -> tuple[list[Row], Head, dict]:
    rows, dropped = job_rows(job.inputs, job.targets, feats, tgts, split, allowed)
    tasks = [tgts[t]["task"] for t in job.targets]
    xs = {s: [feats.arrays[c][r] for c in job.inputs] for s, r in rows.items()}
    ys = {s: [tgts[t]["y"][r] for t in job.targets] for s, r in rows.items()}
    params = dict(cfg.params.get(job.head, {}))  # the user's, for the error line
    with _param_errors(job.head, params):
        head = make_head(job.head, tasks, [feats.arrays[c].shape[1] for c in job.inputs],
                         **head_params(cfg, job.head))
    if HEADS[job.head].needs_text_tower:
        image = columns[job.inputs[0]]
        head.text_encoder = encoder_for_column(columns[column_name(image.encoder, "text")])
    t = time.perf_counter()
    with _param_errors(job.head, params):
        head.fit(xs["train"], ys["train"], xs["val"], ys["val"])
    seconds = time.perf_counter() - t
    eval_split = "test" if len(rows["test"]) else "val"
    probs = head.predict_proba(xs[eval_split])
    clean = ~leak[rows[eval_split]] if leak is not None else None
    out = []
    for ti, task in enumerate(tasks):
        y = ys[eval_split][ti]
        pred = head.decide(ti, probs[ti])
        sc, m = _scores(task, y, probs[ti], pred)
        with_leaks = None
        if clean is not None:  # the same head, scored without the leaked rows
            with_leaks = {**sc, "rows": len(y), "leaked": int((~clean).sum())}
            sc, m = _scores(task, y[clean], probs[ti][clean], pred[clean])
        note = f"{dropped} image(s) without captions left out" if dropped else ""
        kind = " (multi-label)" if task.multilabel else " (regression)" if task.regression else ""
        out.append(Row(job.display, "+".join(job.inputs), task.column + kind, sc["accuracy"],
                       sc["macro_f1"], sc["mAP"], sc["rmse"], sc["r2"], round(seconds, 3),
                       len(rows["train"]), task.multilabel, task.regression, eval_split,
                       f"models/{job.slug}.json", note, head.info, m, with_leaks))
    trained_on: dict[str, Any] = {"run": str(Path(cfg.run).resolve()),
                                  "label_columns": job.targets,
                                  "rows": {s: len(r) for s, r in rows.items()}}
    if label_file is not None:
        trained_on["labels_file"] = label_file.record()
    meta = {"trained_on": trained_on,
            "test_metrics": {r.target: {"accuracy": r.accuracy, "macro_f1": r.macro_f1,
                                        "mAP": r.mAP, "rmse": r.rmse, "r2": r.r2} for r in out}}
    return out, head, meta


@contextlib.contextmanager
def _param_errors(head: str, params: Mapping[str, Any]) -> Iterator[None]:
    """A head that fails on the user's ``[heads.params.<head>]`` overrides (a wrong type or
    value) is one line naming them; without overrides a failure is a bug and stays one."""
    try:
        yield
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        if not params or isinstance(e, UserError):
            raise
        raise InputError(f"[heads.params.{head}] {params} cannot be used: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                         ) from None


def _write(run: Run, cfg: HeadsConfig, rows: list[Row], best: Row, metric: str, saved: list,
           split_record: dict | None, table: str, notes: list[str],
           columns: Mapping[str, Column]) -> None:
    files = run.heads
    if split_record is not None:
        files.write_splits(split_record)
    for job, head, meta in saved:
        save_head(head, files.model_json(job.slug), [(c, columns[c]) for c in job.inputs],
                  _jsonable(meta))
    atomic_write_bytes(files.output("comparison.csv"), heads_report.csv_bytes(rows))
    title = f"{metric} on the {best.eval_split} split, {run.path.name}"
    atomic_write_bytes(files.output("comparison.png"),
                       heads_report.bar_chart(rows, metric, title))
    if not best.multilabel and not best.regression:
        classes = list(best.report["per_class"])
        atomic_write_bytes(files.output("confusion.png"), heads_report.confusion_plot(
            best.report["confusion"], classes,
            f"{best.head} [{best.inputs}], {best.eval_split} split"))
    atomic_write_json(files.output("comparison.json"), _jsonable({
        "config": asdict(replace(cfg, params=dict(cfg.params))), "metric": metric,
        "rows": [r.public() for r in rows], "best": best.public(),
        "reports": {f"{r.head} [{r.inputs}] -> {r.target}": r.report for r in rows},
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
