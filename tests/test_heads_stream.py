"""Heads on features larger than their memory budget: the feature cache, the streamed
probe and torch heads, per-block caption means, and the one-line budget error.

The data is real (scikit-learn's handwritten digits as the image column, a noisy second
view of each as its caption) written through the store's shard writer in shards of 300
rows; tiny budgets and chunk sizes force every streamed path at CI size."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import embeddings.streamed as st
import pipeline.features
from embeddings.features import caption_means
from embeddings.heads import load_head
from embeddings.heads.lbfgs import Data
from embeddings.heads.lbfgs_stream import StreamData
from embeddings.store import Run, read_table, read_vectors
from embeddings.store.imported import VectorShard, write_vectors_run
from pipeline.cli import main
from pipeline.features import load_features

HEADS = ["--heads", "logistic,concat", "--inputs", "px_image,px_text", "--multilabel", "",
         "--multitask", "", "--param", "logistic.sweep_rows=512"]
TINY = "0.002"  # GiB: below the 2.3 MB the digits' features need in memory


def digits_shards(rows: range, shard_rows: int = 300) -> list[VectorShard]:
    d = load_digits()
    x = d.data.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t = x + 0.04 * np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    split = ["train" if i % 10 < 7 else "val" if i % 10 < 8 else "test" for i in range(len(x))]
    out = []
    for s in range(rows.start, rows.stop, shard_rows):
        r = range(s, min(rows.stop, s + shard_rows))
        lab = [f"d{d.target[i]}" for i in r]
        out.append(VectorShard(
            ids=[f"i{i}" for i in r], vectors={"px_image": x[r.start:r.stop]},
            split=[split[i] for i in r], label=lab, labels=[[v] for v in lab],
            captions=[[f"digit {v}"] for v in lab],
            caption_vectors={"px_text": t[r.start:r.stop]}))
    return out


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 128 rows, validation samples of 256 and 100 bytes of metadata per image:
    a run of a thousand rows streams within a megabyte."""
    monkeypatch.setattr(st, "CHUNK_ROWS", 128)
    monkeypatch.setattr(st, "SAMPLE_ROWS", 256)
    monkeypatch.setattr(pipeline.features, "ROW_BYTES", 100)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("digits") / "run"
    write_vectors_run(path, {"px_image": 64, "px_text": 64}, digits_shards(range(1797)))
    return path


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_streamed_heads_match_in_memory(digits_run: Path, tmp_path: Path,
                                        small_chunks: None) -> None:
    """Through the cache with a tiny budget: the probe reaches the in-memory probe's
    accuracy with close weights; concat trains from shuffled chunks as well as in memory."""
    mem, disk = _copy(digits_run, tmp_path / "mem"), _copy(digits_run, tmp_path / "disk")
    assert main(["heads", "--run", str(mem), *HEADS]) == 0
    assert main(["heads", "--run", str(disk), *HEADS, "--memory-budget", TINY]) == 0
    assert not (mem / "heads" / "cache").exists()
    assert len(list((disk / "heads" / "cache").glob("*.f16"))) == 2
    rows = {run: {(r["head"], r["inputs"]): r for r in json.loads(
        (run / "heads" / "comparison.json").read_text())["rows"]} for run in (mem, disk)}
    for key in [("logistic", "px_image"), ("logistic", "px_text")]:
        a, b = rows[mem][key], rows[disk][key]
        assert a["accuracy"] == b["accuracy"] > 0.85, key
        assert b["info"]["sweep_rows"] == 512 < b["rows"]  # the carry fit streamed
        wa = load_head(next((mem / "heads/models").glob(f"logistic-{key[1]}-*.json")))[0]
        wb = load_head(next((disk / "heads/models").glob(f"logistic-{key[1]}-*.json")))[0]
        np.testing.assert_allclose(wb.w, wa.w, atol=0.05 * np.abs(wa.w).max())
    concat = rows[disk][("concat", "px_image+px_text")]
    assert concat["info"]["steps"] > 0
    assert concat["accuracy"] >= rows[mem][("concat", "px_image+px_text")]["accuracy"] - 0.03


def test_streamed_objective_is_the_full_batch_objective(digits_run: Path,
                                                        small_chunks: None) -> None:
    feats = load_features(digits_run, ["px_image", "px_text"], budget_gb=float(TINY))
    assert feats.streamed
    rows = np.arange(0, 1797, 3)
    x = feats.arrays["px_image"][rows]
    y = np.random.default_rng(1).integers(0, 10, len(rows))
    mean, std = st.column_stats(x)
    dense = np.asarray(st.gather([x], np.arange(len(rows)))[0])
    np.testing.assert_allclose(mean, dense.mean(0), atol=1e-6)
    np.testing.assert_allclose(std, dense.std(0), atol=1e-5)
    scale = np.maximum(std, 1e-6)
    cw = np.linspace(0.5, 2, 10).astype(np.float32)
    w = torch.from_numpy(np.random.default_rng(2).standard_normal((65, 10)).astype(np.float32))
    dense_objective = Data.standardising(dense, y, mean, scale, cw).objective(0.01)
    f1, g1 = dense_objective(w)
    streamed = StreamData(x, y, mean, scale, cw).objective(0.01)
    f2, g2 = streamed(w)
    assert f2 == pytest.approx(f1, rel=1e-5)
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-5)
    assert streamed.curv == pytest.approx(dense_objective.curv, rel=1e-5)


def test_epochs_see_every_row_once_in_a_seeded_order(digits_run: Path,
                                                     small_chunks: None) -> None:
    feats = load_features(digits_run, ["px_image", "px_text"], budget_gb=float(TINY))
    rows = np.flatnonzero(np.arange(1797) % 4 != 1)
    x = feats.arrays["px_image"][rows]
    ids = torch.arange(len(rows))

    def epoch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        return [(bx[0], by[0]) for bx, by in st.epoch_batches([x], [ids], 100, gen, list)]

    first = epoch(0)
    assert [len(b) for _, b in first[:-1]] == [100] * (len(first) - 1)
    seen = torch.cat([b for _, b in first])
    assert sorted(seen.tolist()) == list(range(len(rows)))  # each row once
    assert seen.tolist() != list(range(len(rows)))  # shuffled
    dense = st.gather([x], np.arange(len(rows)))[0]
    for bx, by in first:  # each batch's vectors are its rows'
        np.testing.assert_array_equal(bx.numpy(), dense[by.numpy()])
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, epoch(0), strict=True))
    assert not torch.equal(first[0][1], epoch(1)[0][1])


def test_cache_is_reused_and_rebuilt_when_a_shard_changes(tmp_path: Path,
                                                          small_chunks: None) -> None:
    path = tmp_path / "run"
    write_vectors_run(path, {"px_image": 64, "px_text": 64}, digits_shards(range(1200)))
    first = load_features(path, ["px_image", "px_text"], budget_gb=0.001)
    cache = Run(path).heads.cache
    files = {p.name: os.stat(p).st_ino for p in cache.files()}
    assert len(files) == 4  # a data file and a record per column
    again = load_features(path, ["px_image", "px_text"], budget_gb=0.001)
    assert {p.name: os.stat(p).st_ino for p in cache.files()} == files  # reused, not rewritten
    np.testing.assert_array_equal(again.arrays["px_text"][np.arange(1200)].take(
        np.arange(1200)), first.arrays["px_text"][np.arange(1200)].take(np.arange(1200)))
    write_vectors_run(path, {}, digits_shards(range(1200, 1797)), append=True)
    grown = load_features(path, ["px_image", "px_text"], budget_gb=0.001)
    names = {p.name for p in cache.files()}
    assert len(names) == 4 and not names & set(files)  # new keys; the stale files are gone
    mem = load_features(path, ["px_image", "px_text"])
    for col in ("px_image", "px_text"):
        got = grown.arrays[col][np.arange(1797)].take(np.arange(1797))
        np.testing.assert_array_equal(got, mem.arrays[col])
        np.testing.assert_array_equal(grown.present[col], mem.present[col])


def test_a_damaged_cache_is_written_again(digits_run: Path, tmp_path: Path,
                                          small_chunks: None) -> None:
    path = _copy(digits_run, tmp_path / "run")
    load_features(path, ["px_image", "px_text"], budget_gb=float(TINY))
    data = next((path / "heads" / "cache").glob("*.f16"))
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    feats = load_features(path, ["px_image", "px_text"], budget_gb=float(TINY))
    np.testing.assert_array_equal(feats.arrays["px_image"][np.arange(1797)].take(
        np.arange(1797)), read_vectors(path, "px_image").astype(np.float16))


def test_caption_means_per_block_equal_whole_array_means(demo_run: Path,
                                                         small_chunks: None) -> None:
    """Real captions (several per image): the per-block means, in memory and through the
    cache, equal the means of one sums array over the whole column."""
    feats = load_features(demo_run, ["minilm_text"])
    owners = read_table(demo_run, "captions", ["image_id"]).column(0).to_pylist()
    want, has = caption_means(feats.ids, owners, read_vectors(demo_run, "minilm_text"))
    np.testing.assert_array_equal(feats.arrays["minilm_text"], want.astype(np.float16))
    np.testing.assert_array_equal(feats.present["minilm_text"], has)


def test_caption_means_through_the_cache(demo_run: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for module, name in ((st, "CHUNK_ROWS"), (st, "SAMPLE_ROWS"),
                         (pipeline.features, "ROW_BYTES")):
        monkeypatch.setattr(module, name, 8)  # 72 images stream within 100 kB
    path = _copy(demo_run, tmp_path / "run")
    mem = load_features(path, ["minilm_text"])
    disk = load_features(path, ["minilm_text"], budget_gb=1e-4)
    n = len(mem.ids)
    assert disk.streamed and not mem.streamed
    np.testing.assert_array_equal(disk.arrays["minilm_text"][np.arange(n)].take(np.arange(n)),
                                  mem.arrays["minilm_text"])
    np.testing.assert_array_equal(disk.present["minilm_text"], mem.present["minilm_text"])


def test_budget_too_small_to_stream_is_one_line(digits_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = _copy(digits_run, tmp_path / "run")
    assert main(["heads", "--run", str(path), *HEADS, "--memory-budget", "0.0001"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the heads need about") and "memory budget of" in err
    assert "memory_budget_gb" in err and len(err.strip().splitlines()) == 1


def test_a_head_that_cannot_stream_names_the_budget(digits_run: Path, tmp_path: Path,
                                                    small_chunks: None,
                                                    capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    path = _copy(digits_run, tmp_path / "run")
    assert main(["heads", "--run", str(path), "--heads", "late", "--inputs",
                 "px_image,px_text", "--multilabel", "", "--multitask", "",
                 "--memory-budget", "0.001"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # a progress line, then the error
    assert lines[-1].startswith("error: head 'late' trains on whole arrays")
    assert "memory_budget_gb" in lines[-1] and [ln[:6] for ln in lines] == ["heads:", "error:"]
