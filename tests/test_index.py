"""FAISS index library and the index stage: choice, recall vs exact, ids, incremental add."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embeddings import index as ix
from embeddings import read_table, read_vectors
from embeddings.encoders import EncoderSpec, write_tiny_open_clip
from embeddings.errors import InputError, RunMismatch
from embeddings.store import Run, ShardSpan
from pipeline.cli import main
from pipeline.config import IndexConfig, stage_config
from pipeline.embed import run_embed
from pipeline.index import IndexMismatch, open_index, run_index
from pipeline.search import Searcher
from tests._index_fixtures import clustered, exact_top
from tests.conftest import make_config, small_demo

GiB = 2**30


# ------------------------------------------------------------------------ choice rules

def test_choice_small_is_exact_flat() -> None:
    assert ix.choose_index(50_000, 512, 4 * GiB).factory == "Flat"


def test_choice_mid_size_is_hnsw_then_ivf() -> None:
    assert ix.choose_index(200_000, 512, 4 * GiB).factory == "HNSW32"
    c = ix.choose_index(1_000_000, 512, 4 * GiB)
    assert c.factory == "IVF1024,Flat" and c.params == {"nprobe": 16}
    assert c.bytes_estimate <= 4 * GiB


def test_choice_compresses_then_puts_the_lists_on_disk() -> None:
    assert ix.choose_index(1_000_000, 512, 1 * GiB).factory == "IVF1024,SQ8"
    small = ix.choose_index(1_000_000, 512, GiB // 8)
    assert small.factory == "IVF1024,SQ8" and small.on_disk  # lists on disk, not PQ
    assert not ix.choose_index(1_000_000, 512, 1 * GiB).on_disk
    big = ix.choose_index(20_000_000, 512, 4 * GiB)
    assert big.factory == "IVF4096,SQ8" and big.on_disk
    # Flat would fit by count but not by memory: an inverted file instead of exact.
    assert ix.choose_index(50_000, 512, 200 * 2**20).factory.startswith("IVF")
    with pytest.raises(ValueError, match="too small"):
        ix.choose_index(1_000_000, 512, 2**20)


@pytest.mark.parametrize("d", [64, 512, 768])
def test_plans_stay_inside_their_budget(d: int) -> None:
    """Over a grid of sizes and budgets: every piece a build holds at once fits the budget,
    lists go on disk only when they must, and training gets what FAISS asks for."""
    for n in (1_000, 100_000, 1_000_000, 20_000_000, 100_000_000):
        for budget in (GiB // 4, GiB, 4 * GiB, 16 * GiB):
            try:
                choice = ix.choose_index(n, d, budget)
                nlist = ix.ivf_lists(n) if choice.factory.startswith("IVF") else 0
                code = d if "SQ8" in choice.factory else d * 4
                plan = ix.plan_build(choice.factory, n, d, budget, choice.bytes_estimate,
                                     nlist, code, choice.on_disk)
            except InputError as e:
                assert "memory budget" in str(e) and "memory_budget_gb" in str(e)
                continue
            assert plan.peak <= budget, (n, d, budget, plan)
            if nlist:
                assert plan.train_size >= min(n, 39 * nlist)
                assert plan.on_disk == (choice.bytes_estimate * 1.5 > ix.choice.usable(budget, d))
            if plan.builder == "memory":
                assert n * d * 4 <= budget / 2


def test_ivf_lists_about_sqrt_n_power_of_two() -> None:
    for n in (10_000, 1_000_000, 50_000_000):
        nlist = ix.ivf_lists(n)
        assert nlist & (nlist - 1) == 0 and 0.5 <= nlist / np.sqrt(n) <= 2


# --------------------------------------------------------------------- recall vs exact

@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xb = clustered(10_000, 64, seed=0)  # PQ training wants >= 39 * 256
    xq = clustered(200, 64, seed=1)  # held out: not in the database
    return xb, xq, exact_top(xb, xq, 10)


@pytest.mark.parametrize(("factory", "least"), [
    ("Flat", 1.0), ("HNSW32", 0.9), ("IVF64,Flat", 0.9), ("IVF64,SQ8", 0.88),
    ("IVF64,PQ16", 0.5),
])
def test_recall_against_exact(data: tuple[np.ndarray, ...], factory: str, least: float) -> None:
    xb, xq, truth = data
    built = ix.build_and_measure(xb, factory, target_recall=0.95, n_queries=150)
    _, ids = ix.search(built.index, xq, 10)
    held_out = ix.recall_at_k(ids, truth)
    assert held_out >= least, (factory, held_out, built.params)
    assert built.recall >= least
    if factory in ("IVF64,Flat", "IVF64,SQ8"):  # tuned: smallest nprobe reaching 0.95
        assert built.params["nprobe"] < 64


def test_flat_scores_are_cosine(data: tuple[np.ndarray, ...]) -> None:
    xb, xq, truth = data
    index = ix.build_index(xb, "Flat")
    scores, ids = ix.search(index, xq, 10)
    np.testing.assert_array_equal(ids, truth)
    np.testing.assert_allclose(scores, np.take_along_axis(xq @ xb.T, ids, axis=1), rtol=1e-5)


def test_tune_returns_smallest_nprobe_reaching_target(data: tuple[np.ndarray, ...]) -> None:
    xb, xq, truth = data
    index = ix.build_index(xb, "IVF64,Flat")
    params = ix.tune(index, xq, truth, 10, 0.9)
    _, ids = ix.search(index, xq, 10)
    assert ix.recall_at_k(ids, truth) >= 0.9
    if params["nprobe"] > 1:
        ix.set_search_params(index, {"nprobe": params["nprobe"] // 2})
        _, ids = ix.search(index, xq, 10)
        assert ix.recall_at_k(ids, truth) < 0.9


def test_filtered_search_is_exact_on_the_subset(data: tuple[np.ndarray, ...]) -> None:
    xb, xq, _ = data
    allowed = np.zeros(len(xb), bool)
    allowed[::7] = True
    index = ix.build_index(xb, "Flat")
    _, ids = ix.search_filtered(index, xq[:20], 5, allowed)
    sub = np.flatnonzero(allowed)
    np.testing.assert_array_equal(ids, sub[exact_top(xb[sub], xq[:20], 5)])
    _, few = ix.search_filtered(index, xq[:2], 5, np.eye(1, len(xb), 3, dtype=bool)[0])
    assert few.tolist() == [[3, -1, -1, -1, -1]] * 2


@pytest.mark.parametrize("factory", ["Flat", "IVF64,Flat", "HNSW32"])
def test_saved_and_mmap_loaded_answer_the_same(tmp_path: Path, data: tuple[np.ndarray, ...],
                                                factory: str) -> None:
    xb, xq, _ = data
    built = ix.build_and_measure(xb, factory, n_queries=50)
    ix.save_index(built.index, tmp_path / "x.faiss")
    want = ix.search(built.index, xq, 10)
    for mmap in (True, False):
        back = ix.load_index(tmp_path / "x.faiss", mmap=mmap, params=built.params,
                             factory=factory)
        assert ix.search_params(back) == built.params
        got = ix.search(back, xq, 10)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_factory_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="FAISS cannot build 'IVFxyz'"):
        ix.check_factory("IVFxyz", 64)


# ------------------------------------------------------------------------------ stage

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def indexed(demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = _copy(demo_run, tmp_path_factory.mktemp("indexed") / "run")
    run_index(IndexConfig(run=str(run)))
    return run


def test_stage_manifest_records_what_it_built(indexed: Path) -> None:
    manifest = json.loads((indexed / "index" / "manifest.json").read_text())
    embed = Run(indexed).embed.manifest()
    entries = Run(indexed).index.entries()
    assert set(manifest["indexes"]) == set(entries) == set(embed.columns)
    for column, entry in entries.items():
        info = embed.columns[column]
        assert entry.provenance == info.provenance
        assert manifest["indexes"][column]["provenance"] == info.provenance.to_dict()
        assert entry.factory == "Flat" and entry.auto and entry.recall_at_10 == 1.0
        assert entry.ntotal == embed.rows(info.kind) == sum(s.rows for s in entry.shards)
        assert [s.file for s in entry.shards] == [s.file for s in embed.shards[info.kind]]
        assert (indexed / "index" / entry.file).stat().st_size == entry.bytes


def test_hits_map_back_to_their_shard_rows(indexed: Path) -> None:
    """Each stored vector finds its own row; the hit carries that row's id and caption."""
    for column in ("clip_image", "clip_text", "minilm_text"):
        kind = Run(indexed).embed.manifest().columns[column].kind
        table = read_table(indexed, kind).to_pydict()
        vectors = read_vectors(indexed, column)
        s = Searcher(indexed, column, device="cpu")
        for row in (0, 21, len(vectors) - 1):  # rows in the first, a middle, the last shard
            hit = s.search_vector(vectors[row], "self", k=3).hits[0]
            assert hit.row == row and hit.id == table["id"][row]
            if kind == "captions":
                assert hit.caption == table["caption"][row]
                assert hit.image_id == table["image_id"][row]


def test_text_query_embedded_with_the_recorded_model(indexed: Path) -> None:
    table = read_table(indexed, "captions").to_pydict()
    s = Searcher(indexed, "minilm_text", device="cpu")
    result = s.search_text(table["caption"][30], k=5)
    assert result.hits[0].caption == table["caption"][30]
    assert result.hits[0].score == pytest.approx(1.0, abs=2e-3)  # float16 shards


def test_image_query_finds_its_own_image(indexed: Path) -> None:
    table = read_table(indexed, "images").to_pydict()
    root = Path(Run(indexed).embed.manifest().dataset["root"])
    s = Searcher(indexed, "clip_image", device="cpu")
    hit = s.search_image(root / table["image"][5], k=3).hits[0]
    assert (hit.row, hit.image) == (5, table["image"][5])


def test_rerun_is_a_no_op(indexed: Path) -> None:
    before = (indexed / "index" / "manifest.json").read_bytes()
    results = run_index(IndexConfig(run=str(indexed)))
    assert {r.action for r in results} == {"unchanged"}
    assert (indexed / "index" / "manifest.json").read_bytes() == before


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory,
          encoder_specs: tuple[EncoderSpec, ...]) -> tuple[Path, Path]:
    """A run indexed at 24 images, then re-embedded with 48 (new shards appended).

    Blocks of 12 images: the 24 fill two blocks, so growing appends blocks and leaves the
    indexed shards as they are (a partial last block would be re-embedded when it grows).
    """
    base = tmp_path_factory.mktemp("grow")
    small = small_demo(base / "small", per_class=2)
    data = base / "data"
    shutil.copytree(small.parent, data)
    cfg = make_config(data / "manifest.csv", base / "run", encoder_specs, shard_size=12)
    run_embed(cfg)
    first = run_index(IndexConfig(run=str(base / "run")))
    assert {r.ntotal for r in first if r.column == "clip_image"} == {24}
    big = small_demo(base / "big", per_class=4)
    shutil.copytree(big.parent, data, dirs_exist_ok=True)  # same manifest path, more rows
    run_embed(cfg)
    return base / "run", data


def test_search_refuses_a_stale_index(grown: tuple[Path, Path], tmp_path: Path) -> None:
    run = _copy(grown[0], tmp_path / "run")
    with pytest.raises(IndexMismatch, match="stale.*run `make index`"):
        open_index(run, "clip_image")


def test_incremental_add_equals_a_full_rebuild(grown: tuple[Path, Path], tmp_path: Path) -> None:
    run = _copy(grown[0], tmp_path / "inc")
    full = _copy(grown[0], tmp_path / "full")
    added = {r.column: r for r in run_index(IndexConfig(run=str(run)))}
    assert {r.action for r in added.values()} == {"added"}
    assert added["clip_image"].ntotal == 48
    run_index(IndexConfig(run=str(full), rebuild=True))
    for column in ("clip_image", "minilm_text"):
        q = read_vectors(run, column)[::5]
        a, entry = open_index(run, column)
        b, _ = open_index(full, column)
        np.testing.assert_array_equal(ix.search(a, q, 10)[1], ix.search(b, q, 10)[1])
        assert entry.shards == [ShardSpan(s.file, s.rows)
                                for s in Run(run).embed.manifest().shards[entry.kind]]
    files = sorted(p.name for p in (run / "index").glob("*.faiss"))
    assert len(files) == 3  # the replaced index files are gone


def test_refuses_vectors_of_a_different_model(indexed: Path, tmp_path: Path) -> None:
    other = write_tiny_open_clip(tmp_path / "other-clip", seed=1)
    run = tmp_path / "other-run"
    data = small_demo(tmp_path / "d", per_class=6)
    run_embed(make_config(data, run, (EncoderSpec("clip", "open_clip", f"local-dir:{other}"),)))
    shutil.copytree(indexed / "index", run / "index")
    before = (run / "index" / "manifest.json").read_bytes()
    with pytest.raises(RunMismatch, match="clip_image index .*different model.*weights_sha256"):
        run_index(IndexConfig(run=str(run)))
    assert main(["search", "--run", str(run), "anything"]) == 2
    assert (run / "index" / "manifest.json").read_bytes() == before
    # --rebuild replaces it with an index of the new vectors.
    results = run_index(IndexConfig(run=str(run), rebuild=True))
    assert {r.action for r in results} == {"rebuilt"}
    open_index(run, "clip_image")


def test_forced_factory_and_cli(demo_run: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(demo_run, tmp_path / "run")
    assert main(["index", "--run", str(run), "--columns", "minilm_text",
                 "--factory", "IVF4,Flat"]) == 0
    out = capsys.readouterr().out
    assert "index minilm_text: built" in out and "IVF4,Flat" in out
    entry = json.loads((run / "index" / "manifest.json").read_text())["indexes"]["minilm_text"]
    assert entry["factory"] == "IVF4,Flat" and not entry["auto"] and "nprobe" in entry["params"]
    assert main(["index", "--run", str(run), "--factory", "NotAnIndex"]) == 2
    assert "FAISS cannot build 'NotAnIndex'" in capsys.readouterr().err
    assert main(["index", "--run", str(run), "--columns", "nope"]) == 2
    assert "no embedding column 'nope'" in capsys.readouterr().err


def test_index_config_section(tmp_path: Path) -> None:
    raw = {"run": "runs/x", "index": {"memory_budget_gb": 1.5, "columns": ["clip_image"]}}
    cfg = stage_config(IndexConfig, "index", raw, factory="HNSW32")
    assert (cfg.run, cfg.memory_budget_gb, cfg.columns, cfg.factory) == (
        "runs/x", 1.5, ("clip_image",), "HNSW32")
    with pytest.raises(InputError, match=r"unknown key 'budget' in \[index\]"):
        stage_config(IndexConfig, "index", {"index": {"budget": 1}})
