"""The scale paths at CI size, tiny budgets forcing each one: filtered search right first on
every index type, out-of-core builds equal to in-memory ones, on-disk lists, adds that read
only the new shards, hits mapped across shard boundaries, build memory under its budget."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from embeddings import index as ix
from embeddings.index import rare
from embeddings.store import Run
from embeddings.store.embed import EmbedFiles
from pipeline.config import IndexConfig
from pipeline.index import open_index, run_index
from pipeline.search import Searcher
from tests._index_fixtures import clustered, exact_top
from tests._scale_fixtures import COLUMN, RARE, synthetic_run
from tests.conftest import REPO

MiB = 2**20


# ------------------------------------------------------------ filtered search, library

@pytest.fixture(scope="module")
def base() -> np.ndarray:
    return clustered(10_000, 64, seed=0)  # PQ training wants >= 39 * 256


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF64,Flat", "IVF64,SQ8",
                                     "IVF64,PQ16"])
def test_filtered_search_returns_k_hits_for_a_rare_label(base: np.ndarray,
                                                         factory: str) -> None:
    """15 of 10,000 rows match: every query gets 10 of them, the nearest ones for exact
    codes; with 3 matching rows, those 3 and then empty slots."""
    index = ix.build_index(base, factory)
    ix.set_search_params(index, {"nprobe": 1} if "IVF" in factory else
                         {"efSearch": 16} if "HNSW" in factory else {})
    allowed = np.zeros(len(base), bool)
    allowed[np.random.default_rng(3).choice(len(base), 15, replace=False)] = True
    q = clustered(20, 64, seed=5)
    scores, ids = ix.search_filtered(index, q, 10, allowed)
    assert ((ids >= 0).sum(1) == 10).all(), ids
    assert allowed[ids].all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    if factory in ("Flat", "HNSW32", "IVF64,Flat"):  # exact scores: the exact answer
        sub = np.flatnonzero(allowed)
        want = sub[exact_top(base[sub], q, 10)]
        assert [set(r) for r in ids] == [set(r) for r in want]
    few = np.zeros(len(base), bool)
    few[[4, 5000, 9999]] = True
    _, ids = ix.search_filtered(index, q[:4], 5, ix.Allowed.of(few))
    assert [sorted(r[:3]) for r in ids] == [[4, 5000, 9999]] * 4
    assert (ids[:, 3:] == -1).all()


def test_filtered_search_on_on_disk_lists(tmp_path: Path) -> None:
    run, x, labels = synthetic_run(tmp_path / "run", 6_000, 32, 1_000)
    index, _ = _built(run, "IVF32,SQ8", tmp_path, on_disk=True, part_bytes=50_000)
    allowed = np.array([lb == RARE for lb in labels])
    ix.set_search_params(index, {"nprobe": 1})
    _, ids = ix.search_filtered(index, x[:30], 10, allowed)
    assert ((ids >= 0).sum(1) == 10).all() and allowed[ids].all()


def _rare_vs_every_list(index: object, q: np.ndarray, allowed: np.ndarray) -> None:
    """The few-rows path (codes of the kept rows, decoded and scored) gives the ids a scan
    of every list gives, and scores only the kept rows' codes, finding them once."""
    rows = ix.Allowed.of(allowed)
    before = dict(rare.STATS)
    s1, got = ix.search_filtered(index, q, 10, rows)
    _, again = ix.search_filtered(index, q, 10, rows)  # the entries are kept
    assert rare.STATS["searches"] - before["searches"] == 2
    assert rare.STATS["id_scans"] - before["id_scans"] == 1
    assert rare.STATS["codes_scored"] - before["codes_scored"] == 2 * rows.count
    np.testing.assert_array_equal(got, again)
    import faiss

    ivf = ix.ivf_of(index)  # every list, every code: what a scan of the whole index gives
    every = faiss.SearchParametersIVF(sel=faiss.IDSelectorBitmap(rows.n, faiss.swig_ptr(
        rows.bits)), nprobe=int(ivf.nlist))
    s3, want = ix.search(index, q, 10, every)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(s1, s3, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF64,SQ8", "IVF64,PQ16"])
def test_rare_filter_scores_only_its_rows(base: np.ndarray, factory: str) -> None:
    index = ix.build_index(base, factory)
    ix.set_search_params(index, {"nprobe": 1})
    allowed = np.zeros(len(base), bool)
    allowed[np.random.default_rng(4).choice(len(base), 40, replace=False)] = True
    _rare_vs_every_list(index, clustered(20, 64, seed=6), allowed)
    if factory == "IVF64,Flat":  # exact codes: the exact answer
        sub = np.flatnonzero(allowed)
        q = clustered(20, 64, seed=6)
        _, ids = ix.search_filtered(index, q, 10, allowed)
        np.testing.assert_array_equal(ids, sub[exact_top(base[sub], q, 10)])


@pytest.mark.parametrize("factory", ["IVF32,Flat", "IVF32,SQ8", "IVF32,PQ8"])
def test_rare_filter_on_on_disk_lists(tmp_path: Path, factory: str) -> None:
    run, x, labels = synthetic_run(tmp_path / "run", 12_000, 32, 2_500, rare=30)
    index, _ = _built(run, factory, tmp_path, on_disk=True, part_bytes=50_000)
    ix.set_search_params(index, {"nprobe": 1})
    _rare_vs_every_list(index, x[:25], np.array([lb == RARE for lb in labels]))


# --------------------------------------------------------- builders, through the store

def _built(run: Run, factory: str, tmp: Path, on_disk: bool = False,
           part_bytes: int | None = None, builder: str = "out_of_core",
           trained: bytes | None = None) -> tuple[object, ix.Built]:
    """A build of ``factory`` over the run's column; returns (searchable index, Built)."""
    src = run.embed.source(COLUMN)
    n, d = sum(src.shard_rows), src.dim
    nlist, cs = ix.describe(factory, d)
    plan = ix.plan_build(factory, n, d, 2**30, n * (cs + 8), nlist, cs, on_disk)
    plan = replace(plan, builder=builder, chunk_rows=700,
                   part_bytes=part_bytes or plan.part_bytes)
    built = ix.BUILDERS[builder](ix.BuildJob(src, plan, tmp / "scratch", n_queries=50,
                                             trained=trained))
    if built.index is not None:
        return built.index, built
    stem = tmp / f"idx-{len(list(tmp.glob('idx-*')))}"
    ix.write_built(built, stem.with_suffix(".faiss"), stem.with_suffix(".ivfdata"), "x")
    return ix.load_index(stem.with_suffix(".faiss"), lists=stem.with_suffix(".ivfdata")), built


def _lists(index: object) -> list[list[int]]:
    sizes = ix.list_sizes(index)
    return [ix.list_ids(index, j).tolist() for j in range(len(sizes))]


def test_out_of_core_equals_in_memory_for_the_same_training(tmp_path: Path) -> None:
    run, x, _ = synthetic_run(tmp_path / "run", 8_000, 32, [1_500, 2_500, 700, 3_300])
    memory, m = _built(run, "IVF32,Flat", tmp_path, builder="memory")
    trained = ix.serialize(m.trained)
    streamed, _ = _built(run, "IVF32,Flat", tmp_path, trained=trained)
    on_disk, d = _built(run, "IVF32,Flat", tmp_path, on_disk=True, part_bytes=60_000,
                        trained=trained)
    assert len(d.parts) > 2  # the tiny part budget spilled several parts
    assert _lists(memory) == _lists(streamed) == _lists(on_disk)
    for index in (streamed, on_disk):
        ix.set_search_params(index, {"nprobe": 4})
    ix.set_search_params(memory, {"nprobe": 4})
    want = ix.search(memory, x[:50], 10)
    for index in (streamed, on_disk):
        got = ix.search(index, x[:50], 10)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    # The streamed truth (brute force chunk by chunk) is the in-memory exact answer.
    np.testing.assert_array_equal(d.truth.ids, m.truth.ids)


# ------------------------------------------------------------------------------ stage

def _index(run: Path, **kw: object) -> dict[str, object]:
    cfg = IndexConfig(run=str(run), recall_queries=40, progress=False, **kw)
    (result,) = run_index(cfg)
    return {"result": result, "entry": Run(run).index.entries()[COLUMN]}


def test_stage_filters_a_rare_label_on_an_ivf_index(tmp_path: Path, monkeypatch) -> None:
    """The reported bug: `search --label X` on IVF came back empty though rows matched."""
    _, x, labels = synthetic_run(tmp_path / "run", 20_000, 32, 4_000, rare=12)
    got = _index(tmp_path / "run", factory="IVF128,SQ8")
    assert got["entry"].params["nprobe"] < 128
    first = rare.STATS["id_scans"]
    s = Searcher(tmp_path / "run", COLUMN, device="cpu")
    for q in x[:5]:
        hits = s.search_vector(q, "q", k=10, label=RARE).hits
        assert len(hits) == 10 and {h.label for h in hits} == {RARE}
        both = s.search_vector(q, "q", k=10, label=RARE, split="train").hits
        assert 0 < len(both) == min(10, sum(lb == RARE and int(r[1:]) % 2 == 0 for lb, r in
                                            zip(labels, (f"r{i}" for i in range(len(x))))))
        assert all(h.split == "train" and h.label == RARE for h in both)
    assert len(list((tmp_path / "run/index/filters").glob("images.*"))) >= 4  # cached
    # A new searcher (a new `search` process) takes the rare rows' entries from the cache.
    scans = rare.STATS["id_scans"]
    assert scans > first  # the rare label's rows were located in the lists
    # ... and their codes too: no page of the lists is read for them (a cold lists file
    # costs a random read per row).
    gathered = []
    real_gather = rare.gather
    monkeypatch.setattr(rare, "gather", lambda *a: gathered.append(a) or real_gather(*a))
    again = Searcher(tmp_path / "run", COLUMN, device="cpu")
    for q in x[:3]:
        assert again.search_vector(q, "q", k=10, label=RARE).hits == \
            s.search_vector(q, "q", k=10, label=RARE).hits
    assert rare.STATS["id_scans"] == scans and gathered == []


def test_hits_map_to_their_rows_across_shard_boundaries(tmp_path: Path) -> None:
    sizes = [7, 1, 13, 5, 40, 2, 32]
    _, x, labels = synthetic_run(tmp_path / "run", sum(sizes), 16, sizes)
    _index(tmp_path / "run")
    s = Searcher(tmp_path / "run", COLUMN, device="cpu")
    bounds = np.cumsum([0, *sizes])
    for row in sorted({*bounds[:-1], *(bounds[1:] - 1)}):
        hit = s.search_vector(x[row], "self", k=1).hits[0]
        assert (hit.row, hit.id, hit.label) == (row, f"r{row}", labels[row])
    order = np.random.default_rng(0).permutation(len(x))
    table = Run(tmp_path / "run").embed.reader("images").read_rows(order, ["id", "label"])
    assert table.column("id").to_pylist() == [f"r{r}" for r in order]


def test_an_add_reads_only_the_new_shards(tmp_path: Path, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    synthetic_run(run_dir, 100_000, 32, 20_000)
    first = _index(run_dir, memory_budget_gb=12 / 1024, flat_max=1_000)
    entry = first["entry"]
    assert entry.factory == "IVF256,SQ8" and entry.lists and entry.stats["on_disk"]
    assert entry.recall_at_10 >= 0.85
    _, x_new, _ = synthetic_run(run_dir, 10_000, 32, 5_000, seed=9, append=True,
                                first_id=100_000)
    opened: list[str] = []
    check = EmbedFiles.check_shard

    def spy(self: EmbedFiles, record, full: bool = True) -> Path:
        opened.append(record.file)
        return check(self, record, full)

    monkeypatch.setattr(EmbedFiles, "check_shard", spy)
    added = _index(run_dir, memory_budget_gb=12 / 1024, flat_max=1_000)
    assert added["result"].action == "added" and added["entry"].ntotal == 110_000
    assert sorted(set(opened)) == ["images/part-00005.parquet", "images/part-00006.parquet"]
    assert added["entry"].recall_at_10 >= 0.85
    monkeypatch.undo()
    s = Searcher(run_dir, COLUMN, device="cpu")
    assert s.search_vector(x_new[123], "new", k=1).hits[0].id == "r100123"
    assert not list((run_dir / "index").glob(".build-*"))
    files = {p.name for p in (run_dir / "index").iterdir() if p.is_file()} - {".lock"}
    assert files == {"manifest.json", added["entry"].file, added["entry"].lists["file"],
                     added["entry"].truth["file"]}


def test_an_add_keeps_the_index_when_the_choice_would_change(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    synthetic_run(run_dir, 900, 16, 300)
    assert _index(run_dir, flat_max=1_000)["entry"].factory == "Flat"
    synthetic_run(run_dir, 300, 16, 300, seed=4, append=True, first_id=900)
    got = _index(run_dir, flat_max=1_000)
    assert got["result"].action == "added" and got["entry"].factory == "Flat"
    assert "automatic choice is now HNSW32" in got["result"].note
    assert "--rebuild" in got["result"].note
    assert _index(run_dir, flat_max=1_000, rebuild=True)["entry"].factory == "HNSW32"


def test_out_of_core_build_memory_stays_under_its_budget(tmp_path: Path) -> None:
    """300,000 x 32 float16 (37 MiB as float32) under a 16 MiB budget: the lists go on
    disk and the build's peak resident memory grows by the budget plus at most 8 MiB of
    allocator slack (freed pages malloc and Arrow keep: 2.7-4.5 MiB over the budget in
    repeated runs on one machine), well under the column read whole."""
    run_dir = tmp_path / "run"
    synthetic_run(run_dir, 300_000, 32, 30_000)
    code = f"""
import json
from embeddings import index as ix
from embeddings.index import rare
from pipeline.config import IndexConfig
from pipeline.index import run_index
from embeddings.store import Run
import pyarrow.compute  # noqa: the hit tables sort ids with it
ix.BUILDERS, ix.load_index, ix.evaluate  # imports done before measuring
for _, x in Run({str(run_dir)!r}).embed.source("syn_image").chunks([0, 1, 2]):
    pass  # Arrow's reader and allocator warm (a fixed ~80 MiB, whatever the data)
# ... and its string and list decoders, which the hit tables read (a fixed ~25 MiB)
Run({str(run_dir)!r}).embed.reader("images").read_shard(0, ["id", "labels"], threads=False)
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open('/proc/self/clear_refs', 'w').write('5')  # resets the peak (VmHWM) to now
before = status('VmRSS:')
run_index(IndexConfig(run={str(run_dir)!r}, recall_queries=20, progress=False,
                      memory_budget_gb=16 / 1024))
print(json.dumps({{"grew": status('VmHWM:') - before}}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True)
    grew = json.loads(out.stdout.strip().splitlines()[-1])["grew"]
    entry = Run(run_dir).index.entries()[COLUMN]
    assert entry.stats["on_disk"] and entry.lists["bytes"] > 16 * MiB // 2
    assert grew <= 24 * MiB, f"the build grew by {grew / MiB:.1f} MiB"
    index, _ = open_index(run_dir, COLUMN)
    assert index.ntotal == 300_000 and entry.recall_at_10 >= 0.8


# --------------------------------------------------------------------------- heads input

def test_features_stream_in_float16_and_match_whole_column_means(demo_run: Path) -> None:
    from embeddings.features import caption_means
    from embeddings.store import read_table, read_vectors
    from pipeline.features import load_features

    feats = load_features(demo_run, ["clip_image", "minilm_text"])
    assert feats.arrays["clip_image"].dtype == np.float16  # the stored dtype, no float32
    np.testing.assert_array_equal(feats.arrays["clip_image"],
                                  read_vectors(demo_run, "clip_image").astype(np.float16))
    owners = read_table(demo_run, "captions", ["image_id"]).column(0).to_pylist()
    want, has = caption_means(feats.ids, owners, read_vectors(demo_run, "minilm_text"))
    np.testing.assert_allclose(feats.arrays["minilm_text"], want, atol=2e-3)
    np.testing.assert_array_equal(feats.present["minilm_text"], has)


def test_heads_too_large_for_memory_is_one_error(demo_run: Path, tmp_path: Path, monkeypatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    import pipeline.features
    from pipeline.cli import main

    shutil.copytree(demo_run, tmp_path / "run")
    monkeypatch.setattr(pipeline.features, "_available", lambda: 100_000)
    assert main(["heads", "--run", str(tmp_path / "run"), "--heads", "logistic",
                 "--inputs", "clip_image,minilm_text"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the heads need about") and "memory available" in err
    assert len(err.strip().splitlines()) == 1


def test_neighbour_batches_and_list_assignments(tmp_path: Path) -> None:
    """The seams wave 2 builds on: k-NN of every indexed vector chunk by chunk, and which
    inverted list each row is in, with no FAISS in the caller."""
    run, _, _ = synthetic_run(tmp_path / "run", 3_000, 16, 1_000)
    index, _ = _built(run, "IVF16,Flat", tmp_path)
    ix.set_search_params(index, {"nprobe": 16})
    src = run.embed.source(COLUMN)
    got = list(ix.neighbours(index, src.chunks(None, 700), 5))
    starts = [s for s, _, _ in got]  # chunks of at most 700 rows, never across shards
    assert starts == [0, 700, 1000, 1700, 2000, 2700]
    ids = np.concatenate([i for _, _, i in got])
    assert (ids[:, 0] == np.arange(3_000)).all()  # each vector finds itself first
    lists = np.concatenate([a for _, a in ix.assignments(index, src.chunks(None, 700))])
    for j in range(16):
        assert set(ix.list_ids(index, j).tolist()) == set(np.flatnonzero(lists == j).tolist())
