"""Heads, fusions, save/load, bad input and the ``heads`` / ``predict`` commands.

Synthetic problems are seeded and separable; the run-level tests use a copy of the
``demo_run`` fixture (tiny random CLIP + real MiniLM).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embeddings import read_vectors
from embeddings.encoders import encoder_for_column
from embeddings.errors import FormatError, RunMismatch
from embeddings.features import caption_means
from embeddings.heads import HEADS, Task, check_inputs_match, load_head, make_head, save_head
from embeddings.store import FIELDS, Column, Provenance, Run, atomic_write_json, digest_file
from pipeline.cli import main
from pipeline.config import HeadsConfig
from pipeline.heads import run_heads
from pipeline.targets import make_splits, single_targets
from tests._tamper import edit, forge

CLASSES = tuple(f"c{i}" for i in range(4))


pytestmark = pytest.mark.usefixtures("one_thread")


def separable(n: int = 320, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Two modalities (16-d and 12-d) of 4 classes, each alone enough to separate them,
    plus a multi-label target (class, and "odd" for classes 1 and 3)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    xs = []
    for d in (16, 12):
        centres = rng.standard_normal((4, d)) * 3
        x = centres[y] + rng.standard_normal((n, d))
        xs.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    multi = np.zeros((n, 5), dtype=np.float32)
    multi[np.arange(n), y] = 1
    multi[:, 4] = y % 2
    return xs, y, multi


def split3(arrays: list[np.ndarray]) -> tuple[list, list, list]:
    n = len(arrays[0])
    cut = [slice(0, n // 2), slice(n // 2, 3 * n // 4), slice(3 * n // 4, n)]
    return tuple([a[c] for a in arrays] for c in cut)  # type: ignore[return-value]


TRAINED = [h for h in HEADS if h != "zeroshot"]


def columns_of(xs: list[np.ndarray]) -> list[tuple[str, Column]]:
    """``(name, Column)`` inputs of a synthetic head, as ``save_head`` records them."""
    return [(f"col{i}", Column(f"col{i}", "images", "m", "image", "float32",
                               Provenance(type="synthetic", model="m", dim=x.shape[1])))
            for i, x in enumerate(xs)]


@pytest.mark.parametrize("name", TRAINED)
def test_head_learns_separable_problem_and_round_trips(name: str, tmp_path: Path) -> None:
    xs, y, _ = separable()
    if HEADS[name].inputs == "one":
        xs = xs[:1]
    (tr, va, te), (ytr, yva, yte) = split3(xs), split3([y])
    head = make_head(name, [Task("label", CLASSES)], [x.shape[1] for x in xs])
    head.fit(tr, ytr, va, yva)
    assert (head.predict(te)[0] == yte[0]).mean() >= 0.9
    probs = head.predict_proba(te)[0]
    assert probs.shape == (len(yte[0]), 4) and np.allclose(probs.sum(1), 1, atol=1e-5)

    save_head(head, tmp_path / name, columns_of(xs))
    assert not list(tmp_path.glob("*.tmp"))
    loaded, meta = load_head(tmp_path / f"{name}.json")
    assert meta["head"] == name and meta["inputs"][0]["column"] == "col0"
    np.testing.assert_array_equal(loaded.predict_proba(te)[0], probs)


@pytest.mark.parametrize("name", ["mlp", "gated", "logistic", "late"])
def test_fixed_seed_gives_identical_results(name: str) -> None:
    xs, y, _ = separable(seed=3)
    xs = xs[:1] if HEADS[name].inputs == "one" else xs
    (tr, va, te), (ytr, yva, _) = split3(xs), split3([y])
    runs = [make_head(name, [Task("label", CLASSES)], [x.shape[1] for x in xs]).fit(
        tr, ytr, va, yva).predict_proba(te)[0] for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])


def test_logistic_sweeps_and_rebuilds_as_sklearn() -> None:
    xs, y, _ = separable(seed=1)
    (tr, va, te), (ytr, yva, yte) = split3(xs[:1]), split3([y])
    for solver in ("torch", "sklearn"):
        head = make_head("logistic", [Task("label", CLASSES)], [16], solver=solver)
        head.fit(tr, ytr, va, yva)
        info = head.info
        assert info["converged"] and f"{info['lambda']:.3g}" in info["sweep"]
        assert (head.predict(te)[0] == yte[0]).mean() >= 0.9
        np.testing.assert_allclose(head.to_sklearn().predict_proba(te[0]),
                                   head.predict_proba(te)[0], atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "concat", "late"])
def test_multilabel_thresholds_are_tuned_and_saved(name: str, tmp_path: Path) -> None:
    xs, _, multi = separable(seed=2)
    xs = xs[:1] if HEADS[name].inputs == "one" else xs
    (tr, va, te), (mtr, mva, mte) = split3(xs), split3([multi])
    task = Task("labels", (*CLASSES, "odd"), multilabel=True)
    head = make_head(name, [task], [x.shape[1] for x in xs]).fit(tr, mtr, va, mva)
    pred = head.predict(te)[0]
    assert pred.shape == mte[0].shape and (pred == mte[0]).mean() >= 0.95
    save_head(head, tmp_path / "h", columns_of(xs))
    loaded, _ = load_head(tmp_path / "h.json")
    np.testing.assert_array_equal(loaded.predict(te)[0], pred)


def test_multitask_shares_one_trunk() -> None:
    xs, y, multi = separable(seed=4)
    tasks = [Task("label", CLASSES), Task("labels", (*CLASSES, "odd"), multilabel=True)]
    (tr, va, te), (ytr, yva, yte), (mtr, mva, mte) = split3(xs), split3([y]), split3([multi])
    head = make_head("gated", tasks, [16, 12]).fit(tr, [ytr[0], mtr[0]], va, [yva[0], mva[0]])
    single, multiple = head.predict(te)
    assert (single == yte[0]).mean() >= 0.9 and (multiple == mte[0]).mean() >= 0.95
    assert len(head.net.outs) == 2 and head.info["modality_weights"]
    with pytest.raises(ValueError, match="single-label task"):
        make_head("logistic", tasks, [16])


def test_caption_means_match_a_loop() -> None:
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((7, 5)).astype(np.float32)
    owners = ["a", "b", "a", "x", "c", "a", "c"]
    feats, has = caption_means(["a", "b", "c", "d"], owners, vecs)
    for i, image in enumerate("abcd"):
        mine = [v for v, o in zip(vecs, owners, strict=True) if o == image]
        if not mine:
            assert not has[i] and not feats[i].any()
            continue
        m = np.mean(mine, axis=0)
        np.testing.assert_allclose(feats[i], m / np.linalg.norm(m), rtol=1e-5)
    assert has.tolist() == [True, True, True, False]


# ------------------------------------------------------------------------------ bad input

def test_bad_features_are_refused() -> None:
    xs, y, _ = separable()
    head = make_head("concat", [Task("label", CLASSES)], [16, 12])
    bad = xs[0].copy()
    bad[5, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        head.fit([bad, xs[1]], [y], xs, [y])
    with pytest.raises(ValueError, match="dimension 12, the head expects 16"):
        head.fit([xs[1], xs[1]], [y], xs, [y])
    with pytest.raises(ValueError, match="different row counts"):
        head.fit([xs[0], xs[1][:10]], [y], xs, [y])
    with pytest.raises(ValueError, match="targets for"):
        head.fit(xs, [y[:5]], xs, [y])
    with pytest.raises(ValueError, match="two or more input columns"):
        make_head("gated", [Task("label", CLASSES)], [16])
    with pytest.raises(ValueError, match="unknown head"):
        make_head("nope", [Task("label", CLASSES)], [16])
    with pytest.raises(ValueError, match="NaN or inf"):
        caption_means(["a"], ["a"], np.full((1, 3), np.inf, dtype=np.float32))


def test_label_columns_are_checked() -> None:
    table = pa.table({"label": pa.array([None, ""], pa.string()),
                      "labels": pa.array([["a"], []], pa.list_(pa.string()))})
    with pytest.raises(ValueError, match="not found"):
        single_targets(table, "nope")
    with pytest.raises(ValueError, match="is empty"):
        single_targets(table, "label")
    with pytest.raises(ValueError, match="list-valued"):
        single_targets(table, "labels")


def copy_run(demo_run: Path, dst: Path) -> Path:
    shutil.copytree(demo_run, dst)
    return dst


def rewrite_images(run: Path, change: Callable[[dict], None]) -> None:
    """Edit the metadata of every image row of a run in place (shard metadata kept), and
    record the new shards' sizes and digests in the manifest, as the embed stage would."""
    manifest_path = run / "embed" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for record in manifest["shards"]["images"]:
        path = run / "embed" / record["file"]
        table = pq.read_table(path)
        rows = table.drop_columns(["clip_image"]).to_pylist()
        for r in rows:
            change(r)
        new = pa.Table.from_pylist(rows, schema=FIELDS["images"])
        new = new.append_column("clip_image", table.column("clip_image"))
        pq.write_table(new.replace_schema_metadata(table.schema.metadata), path)
        record.update(bytes=path.stat().st_size, digest=digest_file(path))
    forge(manifest_path, manifest, sealed=True)


def small_config(run: Path, **kw: object) -> HeadsConfig:
    base = dict(run=str(run), inputs=("clip_image", "minilm_text"),
                heads=("logistic", "concat"), multilabel="", multitask=())
    return HeadsConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_bad_labels_and_splits_leave_nothing_written(demo_run: Path, tmp_path: Path) -> None:
    run = copy_run(demo_run, tmp_path / "run")
    with pytest.raises(ValueError, match="label column 'nope' not found"):
        run_heads(small_config(run, label="nope"))
    with pytest.raises(FormatError, match="no embedding column"):
        run_heads(small_config(run, inputs=("clip_image", "nope_text")))

    first = {}

    def unseen_in_train(r: dict) -> None:
        first.setdefault("label", r["label"])
        if r["label"] == first["label"]:
            r["split"] = "test"

    rewrite_images(run, unseen_in_train)
    with pytest.raises(ValueError, match="no training rows"):
        run_heads(small_config(run))

    rewrite_images(run, lambda r: r.update(label="same", split="train"))
    with pytest.raises(ValueError, match="single class"):
        run_heads(small_config(run))

    rewrite_images(run, lambda r: r.update(label=None))
    with pytest.raises(ValueError, match="is empty"):
        run_heads(small_config(run))
    # Only the stage's lock file (RUN/heads/.lock) was made: no split, model or report.
    assert {p.name for p in (run / "heads").rglob("*")} <= {".lock"}


def test_splits_are_made_once_and_recorded(tmp_path: Path) -> None:
    ids = [f"i{k}" for k in range(40)]
    labels = [f"c{k % 4}" for k in range(40)]
    cfg = HeadsConfig(val_fraction=0.2, test_fraction=0.2)
    split, record = make_splits(tmp_path, ids, labels, [None] * 40, cfg)
    assert record is not None and sorted(set(split)) == ["test", "train", "val"]
    for c in set(labels):  # stratified: every class in every split
        assert {s for s, lab in zip(split, labels, strict=True) if lab == c} == {
            "train", "val", "test"}
    atomic_write_json(Run(tmp_path).heads.splits_path(), record)
    again, record2 = make_splits(tmp_path, ids, labels, [None] * 40,
                                 HeadsConfig(seed=9, val_fraction=0.3, test_fraction=0.3))
    assert record2 is None and again.tolist() == split.tolist()


# ------------------------------------------------------------------- zero-shot, run, CLI

def test_zeroshot_through_the_tiny_clip_text_tower(demo_run: Path, tmp_path: Path) -> None:
    manifest = Run(demo_run).embed.manifest()
    image = read_vectors(demo_run, "clip_image")
    head = make_head("zeroshot", [Task("label", ("animals", "food", "signs_and_symbols"))],
                     [image.shape[1]])
    head.text_encoder = encoder_for_column(manifest.column("clip_text"))
    head.fit([image], [np.zeros(len(image), dtype=np.int64)], [image[:4]], [np.zeros(4)])
    probs = head.predict_proba([image])[0]
    assert probs.shape == (len(image), 3) and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    w = head.tensors()["class_embeddings"].numpy()
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1, atol=1e-5)
    assert not np.allclose(w[0], w[1])  # different prompts, different class vectors
    save_head(head, tmp_path / "zs", [("clip_image", manifest.column("clip_image"))])
    loaded, meta = load_head(tmp_path / "zs")
    np.testing.assert_array_equal(loaded.predict_proba([image])[0], probs)
    check_inputs_match(meta, manifest.columns)
    col = manifest.column("clip_image")
    other = {**manifest.columns, "clip_image": replace(
        col, provenance=replace(col.provenance, weights_sha256="0" * 64))}
    with pytest.raises(RunMismatch, match="different model"):
        check_inputs_match(meta, other)


def test_cli_heads_then_predict(demo_run: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(demo_run, tmp_path / "run")
    config = tmp_path / "heads.toml"
    config.write_text(
        f'run = "{run}"\n[heads]\ninputs = ["clip_image", "clip_text", "minilm_text"]\n'
        'heads = ["zeroshot", "logistic", "concat", "gated", "late", "late_avg"]\n'
        'multilabel = "labels"\nmultilabel_heads = ["concat"]\n'
        'multitask = ["label", "labels"]\nmultitask_head = "sum"\n')
    assert main(["heads", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "best by macro_f1" in out and "late_avg" in out
    files = {p.name for p in (run / "heads").iterdir()}
    assert {"comparison.csv", "comparison.json", "comparison.png", "confusion.png",
            "models"} <= files
    result = json.loads((run / "heads" / "comparison.json").read_text())
    inputs = {r["inputs"] for r in result["rows"]}
    assert {"clip_image", "minilm_text", "clip_image+clip_text+minilm_text"} <= inputs
    assert any(r["head"] == "sum (multi-task)" for r in result["rows"])
    assert len(result["rows"]) == 1 + 3 + 4 + 1 + 2  # zero-shot, logistic x3, fusions, ml, mt
    for r in result["rows"]:
        assert (r["mAP"] if r["multilabel"] else r["accuracy"]) is not None

    model = run / "heads" / "models" / "late-clip_image+clip_text+minilm_text-label.json"
    assert main(["predict", "--head", str(model), "--run", str(run)]) == 0
    pred = pq.read_table(run / "heads" / "predictions" / (model.stem + ".parquet"))
    assert pred.column_names == ["id", "label", "label_proba"]
    probs = np.array(pred.column("label_proba").to_pylist())
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    head, _ = load_head(model)
    assert set(pred.column("label").to_pylist()) <= set(head.tasks[0].classes)

    # Shards made by another model: refused with a clear message, nothing written.
    other = copy_run(demo_run, tmp_path / "other")
    edit(other / "embed" / "manifest.json",
         lambda m: m["columns"]["clip_image"]["provenance"].update(weights_sha256="f" * 64),
         sealed=True)
    assert main(["predict", "--head", str(model), "--run", str(other)]) == 2
    assert "different model" in capsys.readouterr().err
    assert not (other / "heads").exists()


def rotated(n: int = 800, d: int = 16, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Two noisy views of the same class signal, the second in an unrelated basis (a
    random orthogonal matrix): coordinate i of one has nothing to do with coordinate i
    of the other, although the widths agree (two different encoders)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    centres = rng.standard_normal((4, d))
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    x1 = centres[y] + 1.2 * rng.standard_normal((n, d))
    x2 = (centres[y] + 1.2 * rng.standard_normal((n, d))) @ q.T
    return [x1.astype(np.float32), x2.astype(np.float32)], y


def _accuracy(name: str, xs: list[np.ndarray], y: np.ndarray, **params: object) -> float:
    (tr, va, te), (ytr, yva, yte) = split3(xs), split3([y])
    head = make_head(name, [Task("label", CLASSES)], [16, 16], **params).fit(tr, ytr, va, yva)
    if name != "concat":
        assert head.info["shared_space"] is bool(params.get("shared_space", False))
    return float((head.predict(te)[0] == yte[0]).mean())


@pytest.mark.parametrize("name", ["sum", "sum_mlp", "product", "gated"])
def test_fusion_learns_inputs_in_unrelated_bases(name: str) -> None:
    xs, y = rotated()
    # Learned projections into one space: as good as concatenation (1.0 here).
    assert _accuracy(name, xs, y) >= 0.97


def test_identity_fusion_only_when_asked_and_it_hurts_unrelated_bases() -> None:
    xs, y = rotated()
    projected, identity = _accuracy("sum", xs, y), _accuracy("sum", xs, y, shared_space=True)
    assert identity < projected - 0.03  # adding unrelated coordinates loses signal
    with pytest.raises(ValueError, match="one width"):
        make_head("product", [Task("label", CLASSES)], [16, 12], shared_space=True)
