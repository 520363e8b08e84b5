"""Heads stage: train and compare classification heads on a run's cached embeddings.

Reads ``RUN/embed`` (no model runs, except a text tower for heads that declare they need
one, like zero-shot) and writes ``RUN/heads`` under its lock: every trained head (bound
to the embed provenance of its inputs), the comparison table (CSV, JSON, bar chart) and
the best head's confusion matrix.  Everything is checked (labels, splits, finite
features) before anything is trained and written at the end through atomic renames.
Roles: :mod:`.features` (arrays), :mod:`.targets` (tasks, splits), this module (plan,
train, compare), :mod:`.heads_report` (table, plots), :mod:`.predict` (apply a head).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from embeddings import metrics
from embeddings.encoders import encoder_for_column
from embeddings.errors import InputError, UserError
from embeddings.heads import HEADS, Head, make_head, save_head
from embeddings.store import Column, Run, atomic_write_bytes, atomic_write_json, column_name

from . import heads_report
from .config import HeadsConfig
from .features import Features, load_features
from .targets import SPLITS, make_splits, single_targets, targets

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
    train_s: float
    rows: int
    multilabel: bool
    eval_split: str
    model: str
    notes: str
    info: dict[str, Any]
    report: dict[str, Any]

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "report"}


def plan(cfg: HeadsConfig, columns: Mapping[str, Column]) -> list[Job]:
    """The heads to train: single-input heads once per column, fusions over all columns."""
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

    jobs = [j for h in cfg.heads for j in expand(h, (cfg.label,), h)]
    if cfg.multilabel:
        jobs += [j for h in cfg.multilabel_heads for j in expand(h, (cfg.multilabel,), h)]
    if cfg.multitask:
        name = cfg.multitask_head
        jobs += expand(name, tuple(cfg.multitask), f"{name} (multi-task)")
    return jobs


def check_config(cfg: HeadsConfig) -> None:
    names = set(cfg.heads) | set(cfg.multilabel_heads) | set(cfg.params)
    names |= {cfg.multitask_head} if cfg.multitask else set()
    unknown = sorted(names - set(HEADS))
    if unknown:
        raise InputError(f"unknown head(s) {unknown}; known: {sorted(HEADS)}")
    if not cfg.inputs:
        raise InputError("[heads] inputs is empty: name the embedding columns to train on")
    if not 0 < cfg.val_fraction < 1 or not 0 < cfg.test_fraction < 1 - cfg.val_fraction:
        raise InputError("val_fraction and test_fraction must be in (0, 1) and sum below 1")


@dataclass
class HeadsResult:
    run_dir: Path
    rows: list[Row]
    best: Row
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
    jobs = plan(cfg, manifest.columns)
    with run.lock("heads"):
        feats = load_features(run.path, cfg.inputs)
        _, labels = single_targets(feats.table, cfg.label)
        split, split_record = make_splits(run.path, feats.ids, labels,
                                          feats.table.column("split").to_pylist(), cfg)
        tgts = targets({c for j in jobs for c in j.targets}, feats, split)
        notes = [n for t in tgts.values() for n in t["notes"]]
        rows, saved = [], []
        for job in jobs:
            row_set, head, meta = _train(job, cfg, feats, tgts, split, manifest.columns)
            log.debug("trained %s on %s in %.2f s", job.display, job.inputs, row_set[0].train_s)
            rows += row_set
            saved.append((job, head, meta))
        single = [r for r in rows if not r.multilabel]
        best = max(single or rows, key=lambda r: (np.nan_to_num(getattr(r, cfg.metric),
                                                                nan=-1), -r.train_s))
        table = heads_report.format_table(rows)
        _write(run, cfg, rows, best, saved, split_record, table, notes, manifest.columns)
    return HeadsResult(run.path, rows, best, table, notes, time.perf_counter() - t0)


def _train(job: Job, cfg: HeadsConfig, feats: Features, tgts: Mapping[str, Any],
           split: np.ndarray, columns: Mapping[str, Column]) -> tuple[list[Row], Head, dict]:
    keep = np.logical_and.reduce([feats.present[c] for c in job.inputs]
                                 + [tgts[t]["has"] for t in job.targets])
    dropped = int(np.logical_and.reduce([tgts[t]["has"] for t in job.targets]).sum()
                  - keep.sum())
    rows = {s: np.flatnonzero(keep & (split == s)) for s in SPLITS}
    tasks = [tgts[t]["task"] for t in job.targets]
    xs = {s: [feats.arrays[c][r] for c in job.inputs] for s, r in rows.items()}
    ys = {s: [tgts[t]["y"][r] for t in job.targets] for s, r in rows.items()}
    seed = {"seed": cfg.seed} if "seed" in HEADS[job.head].defaults else {}
    params = dict(cfg.params.get(job.head, {}))
    with _param_errors(job.head, params):
        head = make_head(job.head, tasks, [feats.arrays[c].shape[1] for c in job.inputs],
                         **params, **seed)
    if HEADS[job.head].needs_text_tower:
        image = columns[job.inputs[0]]
        head.text_encoder = encoder_for_column(columns[column_name(image.encoder, "text")])
    t = time.perf_counter()
    with _param_errors(job.head, params):
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
        out.append(Row(job.display, "+".join(job.inputs),
                       task.column + (" (multi-label)" if task.multilabel else ""), acc, f1, ap,
                       round(seconds, 3), len(rows["train"]), task.multilabel, eval_split,
                       f"models/{job.slug}.json", note, head.info, m))
    meta = {"trained_on": {"run": str(Path(cfg.run).resolve()), "label_columns": job.targets,
                           "rows": {s: len(r) for s, r in rows.items()}},
            "test_metrics": {r.target: {"accuracy": r.accuracy, "macro_f1": r.macro_f1,
                                        "mAP": r.mAP} for r in out}}
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


def _write(run: Run, cfg: HeadsConfig, rows: list[Row], best: Row, saved: list,
           split_record: dict | None, table: str, notes: list[str],
           columns: Mapping[str, Column]) -> None:
    files = run.heads
    if split_record is not None:
        files.write_splits(split_record)
    for job, head, meta in saved:
        save_head(head, files.model_json(job.slug), [(c, columns[c]) for c in job.inputs],
                  _jsonable(meta))
    atomic_write_bytes(files.output("comparison.csv"), heads_report.csv_bytes(rows))
    title = f"{cfg.metric} on the {best.eval_split} split, {run.path.name}"
    atomic_write_bytes(files.output("comparison.png"),
                       heads_report.bar_chart(rows, cfg.metric, title))
    if not best.multilabel:
        classes = list(best.report["per_class"])
        atomic_write_bytes(files.output("confusion.png"), heads_report.confusion_plot(
            best.report["confusion"], classes,
            f"{best.head} [{best.inputs}], {best.eval_split} split"))
    atomic_write_json(files.output("comparison.json"), _jsonable({
        "config": asdict(replace(cfg, params=dict(cfg.params))), "metric": cfg.metric,
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
