"""Labels from a side file: read in every format, joined by id with every oddity
counted, and a relabelling run that trains and predicts a new task (classification and
regression) on an existing run without any embedding and without touching its shards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embeddings.errors import InputError, MissingError
from embeddings.store import Run
from pipeline.cli import main
from pipeline.labels import join_labels, read_label_file

from .test_heads import copy_run

ROWS = [{"id": "a", "kind": "x", "tags": ["t1", "t2"], "score": 1.5},
        {"id": "b", "kind": "y", "tags": ["t2"], "score": None},
        {"id": "c", "kind": None, "tags": [], "score": 3.0}]


def write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".csv":
        lines = ["id,kind,tags,score"] + [
            f"{r['id']},{r['kind'] or ''},{'|'.join(r['tags'])},"
            f"{'' if r['score'] is None else r['score']}" for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_every_format_reads_the_same(tmp_path: Path, suffix: str) -> None:
    labels = read_label_file(write(tmp_path / f"l{suffix}", ROWS), multilabel=["tags"])
    t = labels.table
    assert t.column("id").to_pylist() == ["a", "b", "c"]
    assert t.column("kind").to_pylist() == ["x", "y", None if suffix != ".csv" else ""]
    assert t.column("tags").to_pylist() == [["t1", "t2"], ["t2"], []]
    assert t.column("score").to_pylist() == [1.5, None, 3.0]
    assert labels.sha256 == hashlib.sha256((tmp_path / f"l{suffix}").read_bytes()).hexdigest()
    assert (labels.rows, labels.duplicates, labels.conflicts) == (3, 0, 0)


def test_join_counts_unknown_ids_duplicates_and_conflicts(tmp_path: Path) -> None:
    rows = [*ROWS, dict(ROWS[0]), {**ROWS[1], "kind": "z"}, {**ROWS[2], "id": "nope"},
            {**ROWS[2], "id": "nope2"}]
    labels = read_label_file(write(tmp_path / "l.jsonl", rows))
    assert (labels.rows, labels.duplicates, labels.conflicts) == (7, 1, 1)
    images = pa.table({"id": ["c", "a", "b", "d"], "split": ["train"] * 4,
                       "label": ["old"] * 4, "labels": pa.array([[]] * 4, pa.list_(pa.string()))})
    joined, notes = join_labels(images, labels)
    assert joined.column("kind").to_pylist() == [None, "x", None, None]  # b: conflicting
    assert joined.column("label").to_pylist() == ["old"] * 4  # not in the file: kept
    text = " ".join(notes)
    assert "3 of the run's 4 image(s) matched" in text and "2 id(s) not in the run" in text
    assert "['nope', 'nope2']" in text and "1 duplicate row(s)" in text
    assert "1 id(s) with duplicate rows that disagree" in text


def test_bad_label_files_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MissingError, match="labels file not found"):
        read_label_file(tmp_path / "none.csv")
    with pytest.raises(InputError, match="unknown format"):
        read_label_file(write(tmp_path / "l.csv", ROWS).rename(tmp_path / "l.txt"))
    (tmp_path / "noid.csv").write_text("name,kind\na,x\n")
    with pytest.raises(InputError, match="needs an 'id' column"):
        read_label_file(tmp_path / "noid.csv")
    (tmp_path / "split.csv").write_text("id,split\na,train\n")
    with pytest.raises(InputError, match="cannot be relabelled"):
        read_label_file(tmp_path / "split.csv")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot be read as parquet"):
        read_label_file(tmp_path / "bad.parquet")
    (tmp_path / "ragged.csv").write_text("id,kind\na,x,extra\n")
    with pytest.raises(InputError, match="cannot be read as csv"):
        read_label_file(tmp_path / "ragged.csv")
    images = pa.table({"id": ["q"], "split": ["train"]})
    with pytest.raises(InputError, match="none of its 3 id"):
        join_labels(images, read_label_file(write(tmp_path / "l.jsonl", ROWS)))


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model load fails the test: relabelling must not embed."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded")
    monkeypatch.setattr("embeddings.encoders.load_encoder", refuse)
    monkeypatch.setattr("pipeline.heads.encoder_for_column", refuse)


def test_relabel_a_run_without_embedding(demo_run: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(demo_run, tmp_path / "run")
    images = Run(run).embed.read_table("images", ["id", "label"]).to_pylist()
    rows = [{"id": r["id"], "animal": "yes" if r["label"] == "animals" else "no",
             "score": float(len(r["label"]) + (i % 3))} for i, r in enumerate(images)]
    rows += [{"id": "elsewhere/1", "animal": "yes", "score": 1.0}, dict(rows[0])]
    labels = tmp_path / "animal.parquet"
    pq.write_table(pa.Table.from_pylist(rows), labels)
    sha = hashlib.sha256(labels.read_bytes()).hexdigest()
    before = digests(run / "embed")
    no_models(monkeypatch)

    base = ["heads", "--run", str(run), "--labels", str(labels), "--inputs",
            "clip_image,minilm_text", "--multilabel", "", "--multitask", ""]
    assert main([*base, "--label", "animal", "--heads", "logistic,linear,late"]) == 0
    out = capsys.readouterr().out
    assert "1 id(s) not in the run, ignored: ['elsewhere/1']" in out
    assert "1 duplicate row(s)" in out and f"sha256 {sha[:12]}" in out
    model = run / "heads" / "models" / "linear-minilm_text-animal.json"
    meta = json.loads(model.read_text())
    assert meta["tasks"][0]["classes"] == ["no", "yes"]
    assert meta["trained_on"]["labels_file"]["sha256"] == sha
    assert main(["predict", "--head", str(model), "--run", str(run)]) == 0
    assert sha[:12] in capsys.readouterr().out
    pred = pq.read_table(run / "heads" / "predictions" / "linear-minilm_text-animal.parquet")
    assert pred.schema.metadata[b"embeddings.labels_sha256"].decode() == sha
    assert set(pred.column("animal").to_pylist()) <= {"no", "yes"}

    # A numeric column is a regression target: only the heads that regress run.
    assert main([*base, "--label", "score", "--heads", "logistic,linear,concat"]) == 0
    out = capsys.readouterr().out
    assert "rmse" in out and "r2" in out and "['logistic'] only classify" in out
    assert "best by r2" in out
    result = json.loads((run / "heads" / "comparison.json").read_text())
    assert {r["head"] for r in result["rows"]} == {"linear", "concat"}
    assert all(np.isfinite(r["rmse"]) and r["regression"] for r in result["rows"])
    model = run / "heads" / "models" / "concat-clip_image+minilm_text-score.json"
    assert main(["predict", "--head", str(model), "--run", str(run)]) == 0
    pred = pq.read_table(run / "heads" / "predictions" / (model.stem + ".parquet"))
    assert pred.schema.field("score").type == pa.float32()
    assert np.isfinite(np.array(pred.column("score").to_pylist())).all()
    assert digests(run / "embed") == before  # the shards were only read
