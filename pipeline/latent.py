"""Latent stage: a meta-space column learned over columns of a run (autoencoder or VAE).

Order of work: plan the inputs (the embed stage's own columns; one row per image when
one of them is an image column, :mod:`.latent_rows`).  Under the ``latent`` lock: reuse
the saved model NAME when it was trained on these inputs with these settings (a saved
model whose inputs were made by other models than the run's columns now is refused;
``--rebuild`` retrains), else stream the shards once for a seeded sample of at most
``max_rows`` rows (float16), train on it (validation: ``val_fraction`` of the sample;
PCA of the same width is round 0, so the model never ends worse than PCA there) and
save it.  Under the ``derived`` lock: stream every shard the column lacks through the
encoder, one shard at a time, and write its unit-length latents as one part of column
``NAME_latent`` (:mod:`embeddings.store.derived`); the column's manifest entry last.

When ``embed`` appends shards the column is stale (reading it is refused, naming this
stage): rerunning ``latent`` encodes only the new shards with the saved model, in
seconds, the way ``index`` adds only new shards.  ``embed`` itself never touches it: it
would have to load a model another stage trained, under a lock that is not its own.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from embeddings.errors import InputError, MissingError
from embeddings.latent import (
    LatentModel,
    LatentParams,
    check_latent_inputs,
    fit_latent,
    latent_provenance,
    load_latent,
    save_latent,
)
from embeddings.store import (
    Column,
    DerivedColumn,
    Provenance,
    Run,
    check_name,
    column_name,
)

from .config_latent import LatentConfig
from .latent_rows import Plan, plan_inputs, shard_rows

log = logging.getLogger(__name__)
MIN_VAL = 64  # validation rows of a small run (at most 20% of it)
SETTINGS = ("kind", "dim", "hidden", "modality_dropout", "beta", "lr", "batch_size",
            "max_rows", "val_fraction", "round_rows", "max_rounds", "patience", "seed")


@dataclass(frozen=True)
class LatentResult:
    name: str
    column: str
    path: str
    action: str  # trained | reused
    note: str
    rows: int  # rows of the column
    encoded_shards: int  # parts written by this run (the rest were up to date)
    shards: int
    train_rows: int
    val_rows: int
    val_error: float  # validation reconstruction error of the model
    pca_error: float  # the same for a PCA of the same width (round 0)
    train_s: float  # fitting (after the sample was read)
    encode_s: float  # streaming the shards through the encoder, writing the parts
    seconds: float


def run_latent(cfg: LatentConfig) -> LatentResult:
    t0 = time.perf_counter()
    check_config(cfg)
    name = check_name(cfg.name, "latent name")
    column = column_name(name, "latent")
    run = Run(cfg.run)
    manifest = run.embed.manifest()
    if column in manifest.own_columns:
        raise InputError(f"column {column} is a column of the embed stage: choose another "
                         "[latent] name")
    plan = plan_inputs(manifest, cfg.inputs)
    with run.lock("latent"):
        model, note = _saved(run, name, cfg, plan)
        if model is None:
            model = _train(run, cfg, plan)
            save_latent(model, run.latent.writable(name))
        path = run.latent.path(name)
    prov = latent_provenance(path, column)
    spec = Column(column, plan.kind, name, "latent", cfg.dtype, prov).to_dict()
    shards = manifest.shards[plan.kind]
    with run.lock("derived"):
        old = run.derived.columns().get(column)
        same = old is not None and _same_column(old.spec, spec)
        reuse = {(p.source, p.source_digest, p.rows): p for p in old.parts} if same else {}
        todo = [i for i, s in enumerate(shards) if (s.file, s.digest, s.rows) not in reuse]
        new, t_enc = {}, time.perf_counter()
        bar = tqdm(total=sum(shards[i].rows for i in todo), unit="row", leave=False,
                   desc=f"latent: encoding {column}", disable=not cfg.progress)
        with bar:
            for rows in shard_rows(run, plan, cfg.verify, todo):
                z = model.encode(rows.xs, rows.present)
                z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
                rec = shards[rows.shard]
                new[rows.shard] = run.derived.write_part(column, rec.block, rec, z, cfg.dtype)
                bar.update(rec.rows)
        parts = [new[i] if i in new else reuse[(s.file, s.digest, s.rows)]
                 for i, s in enumerate(shards)]
        run.derived.put(DerivedColumn(column, spec, "latent", name, parts))
        encode_s = time.perf_counter() - t_enc
    info = model.info
    hist = info.get("val_by_round", [float("nan")])
    return LatentResult(name, column, str(path), "reused" if note else "trained", note,
                        sum(s.rows for s in shards), len(todo), len(shards),
                        int(info.get("train_rows", 0)), int(info.get("val_rows", 0)),
                        float(hist[info.get("best_round", 0)]), float(hist[0]),
                        float(info.get("train_s", 0.0)) if not note else 0.0, encode_s,
                        time.perf_counter() - t0)


def check_config(cfg: LatentConfig) -> None:
    """Every [latent] number in its range, before any work (LatentParams checks the rest)."""
    if not 0 < cfg.val_fraction < 1:
        raise InputError(f"[latent] val_fraction must be in (0, 1), not {cfg.val_fraction}")
    if cfg.max_rows < 2:
        raise InputError(f"[latent] max_rows must be >= 2, not {cfg.max_rows}")
    try:
        _params(cfg)
    except ValueError as e:
        raise InputError(f"[latent] {e}") from None


def _params(cfg: LatentConfig) -> LatentParams:
    return LatentParams(kind=cfg.kind, dim=cfg.dim, hidden=cfg.hidden, lr=cfg.lr,
                        batch_size=cfg.batch_size, modality_dropout=cfg.modality_dropout,
                        beta=cfg.beta, round_rows=cfg.round_rows, max_rounds=cfg.max_rounds,
                        patience=cfg.patience, seed=cfg.seed, threads=cfg.threads or None)


def _settings(cfg: LatentConfig) -> dict[str, Any]:
    return {"inputs": list(cfg.inputs), **{k: getattr(cfg, k) for k in SETTINGS}}


def _saved(run: Run, name: str, cfg: LatentConfig,
           plan: Plan) -> tuple[LatentModel | None, str]:
    """The saved model ``name`` when it fits (and why it is reused), else (None, "")."""
    if cfg.rebuild:
        return None, ""
    try:
        model = load_latent(run.latent.path(name))
    except MissingError:
        return None, ""
    if _canonical(model.info.get("settings")) != _canonical(_settings(cfg)):
        log.info("latent %s: the [latent] settings changed since it was trained: retraining",
                 name)
        return None, ""
    check_latent_inputs(model, {c.name: c for c in plan.columns}, f"run {run.path}")
    return model, "the settings and inputs are those it was trained with"


def _train(run: Run, cfg: LatentConfig, plan: Plan) -> LatentModel:
    """Sample at most ``max_rows`` rows (one pass), split off validation, fit."""
    total = run.embed.manifest().rows(plan.kind)
    keep = min(1.0, cfg.max_rows / max(1, total))
    # a small run validates on at least MIN_VAL rows (up to 20%): 5% of 300 rows is noise
    frac = max(cfg.val_fraction, min(0.2, MIN_VAL / max(1, min(total, cfg.max_rows))))
    rng = np.random.default_rng(cfg.seed)
    train: list[list[np.ndarray]] = [[] for _ in range(2 * len(plan.columns))]
    val: list[list[np.ndarray]] = [[] for _ in range(2 * len(plan.columns))]
    with tqdm(total=total, unit="row", desc="latent: sampling rows", leave=False,
              disable=not cfg.progress) as bar:
        for rows in shard_rows(run, plan, cfg.verify):
            n = len(rows.present[0])
            draw, split = rng.random(n), rng.random(n)
            picked = draw < keep
            for i, (x, p) in enumerate(zip(rows.xs, rows.present)):
                for into, rows_of in ((train, picked & (split >= frac)),
                                      (val, picked & (split < frac))):
                    into[2 * i].append(np.asarray(x[rows_of], np.float16))
                    into[2 * i + 1].append(p[rows_of])
            bar.update(n)
    t = [np.concatenate(a) for a in train]
    v = [np.concatenate(a) for a in val]
    n_train, n_val = len(t[1]), len(v[1])
    if n_val == 0 and n_train > 2:  # a tiny run: one row validates
        v = [a[-1:] for a in t]
        t = [a[:-1] for a in t]
        n_train, n_val = n_train - 1, 1
    if n_train < 2 or n_val < 1:
        raise InputError(f"too few {plan.kind} rows to train a latent model ({n_train} train, "
                         f"{n_val} validation): embed more rows or raise --max-rows")
    p = _params(cfg)
    if p.dim > sum(c.dim for c in plan.columns):
        raise InputError(f"[latent] dim {p.dim} is wider than its inputs "
                         f"({sum(c.dim for c in plan.columns)})")
    model = fit_latent(t[0::2], t[1::2], v[0::2], v[1::2], params=p, progress=cfg.progress)
    model.inputs = list(plan.columns)
    model.info |= {"settings": _settings(cfg), "train_rows": n_train, "val_rows": n_val,
                   "sampled_from": total}
    return model


def _same_column(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two column descriptions are the same column (the model's identity, not
    where its file was: a copied run keeps its parts)."""
    def key(d: dict[str, Any]) -> str:
        prov = Provenance.from_dict(d.get("provenance"), "derived column")
        return _canonical({**d, "provenance": prov.identity()})
    return key(a) == key(b)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def format_result(r: LatentResult) -> str:
    """What the CLI prints."""
    lines = [f"latent {r.name} ({r.action}{': ' + r.note if r.note else ''})"]
    if r.action == "trained":
        lines.append(f"  trained on {r.train_rows} rows in {r.train_s:.1f} s; validation "
                     f"reconstruction error {r.val_error:.4f} (PCA of the same width "
                     f"{r.pca_error:.4f}) on {r.val_rows} rows")
    lines += [f"  column {r.column}: {r.rows} rows in {r.shards} parts, {r.encoded_shards} "
              f"written now in {r.encode_s:.1f} s ({r.seconds:.1f} s in all)",
              f"  model: {r.path}"]
    return "\n".join(lines)


__all__ = ["LatentResult", "format_result", "run_latent"]
