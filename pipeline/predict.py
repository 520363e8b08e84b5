"""Apply a saved head to a run's shards: predictions as Parquet, refused on another model."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embeddings.errors import InputError
from embeddings.heads import check_inputs_match, load_head
from embeddings.store import Run, atomic_write_bytes

from .features import load_features


@dataclass
class PredictResult:
    path: Path
    rows: int
    dropped: int
    labels_sha256: str | None = None  # the label side file the head was trained on


def run_predict(head_path: str | Path, run: str | Path, output: str | Path | None = None
                ) -> PredictResult:
    """Predict with a saved head on the shards of ``run``; write Parquet (atomically):
    ``id``, then per task the predicted label(s) and ``<column>_proba`` (class order in
    the file metadata), or the predicted value of a regression task.  The metadata also
    names the head and the digest of the label file it was trained on, if any."""
    head, meta = load_head(head_path)
    files = Run(run)
    path = Path(output) if output else files.heads.prediction(Path(head_path).stem)
    _check_output(path, Path(head_path).with_suffix(".json"), files)
    check_inputs_match(meta, files.embed.manifest().columns, where=f"run {run}")
    columns = [i["column"] for i in meta["inputs"]]
    feats = load_features(run, columns)
    keep = np.logical_and.reduce([feats.present[c] for c in columns])
    probs = head.predict_proba([feats.arrays[c][keep] for c in columns])
    ids = [i for i, k in zip(feats.ids, keep, strict=True) if k]
    arrays, names = [pa.array(ids, pa.string())], ["id"]
    for t, task in enumerate(head.tasks):
        decided = head.decide(t, probs[t])
        classes = np.array(task.classes, dtype=object)
        if task.regression:
            arrays.append(pa.array(decided.astype(np.float32), pa.float32()))
            names.append(task.column)
            continue
        if task.multilabel:
            arrays.append(pa.array([classes[row.astype(bool)].tolist() for row in decided],
                                   pa.list_(pa.string())))
        else:
            arrays.append(pa.array(classes[decided].tolist(), pa.string()))
        flat = pa.array(probs[t].astype(np.float32).reshape(-1), pa.float32())
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, len(task.classes)))
        names += [task.column, f"{task.column}_proba"]
    labels = meta.get("trained_on", {}).get("labels_file") or {}
    sha = labels.get("sha256") if isinstance(labels, dict) else None
    extra = {b"embeddings.labels_sha256": str(sha).encode()} if sha else {}
    table = pa.Table.from_arrays(arrays, names=names).replace_schema_metadata({
        b"embeddings.head": (Path(head_path).with_suffix(".json").name).encode(),
        b"classes": json.dumps({t.column: list(t.classes) for t in head.tasks
                                if not t.regression}).encode(), **extra})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(path, buf.getvalue())
    return PredictResult(path, len(ids), int((~keep).sum()), sha)


def _check_output(path: Path, head: Path, run: Run) -> None:
    """Refuse an output that would overwrite the head, its weights or a file of the run
    (only ``RUN/heads/predictions/`` takes predictions), or that names a folder."""
    if path.is_dir():
        raise InputError(f"--output {path} is a directory: name a .parquet file")
    real = Path(os.path.realpath(path))
    models = Path(os.path.realpath(head.parent))
    predictions = Path(os.path.realpath(run.heads.dir / "predictions"))
    inside_run = real.is_relative_to(os.path.realpath(run.path))
    if real.is_relative_to(models) or (inside_run and not real.is_relative_to(predictions)):
        raise InputError(f"--output {path} is a file of the run or of the head, which a "
                         f"prediction must never overwrite: name a file outside {run.path} "
                         f"(or leave --output out: {run.heads.dir}/predictions/)")
