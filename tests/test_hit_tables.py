"""Hit tables (:mod:`embeddings.store.hits`): the same rows as the Parquet shards, rebuilt
when stale or missing, refused when tampered with, optional for search."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from embeddings.errors import FormatError
from embeddings.store import Run, Tampered
from pipeline.cli import main
from pipeline.config import IndexConfig
from pipeline.index import run_index
from pipeline.search import CAPTION_META, IMAGE_META, Searcher
from tests._scale_fixtures import COLUMN, synthetic_run
from tests._tamper import edit

SIZES = [7, 1, 13, 5, 40, 2, 32]
FIELDS = ["id", "image", "split", "label", "labels", "captions"]


def _index(run: Path) -> None:
    run_index(IndexConfig(run=str(run), recall_queries=20, progress=False))


def _parquet_reader(run: Path, kind: str = "images"):  # the shards alone, no hit tables
    reader = Run(run).embed.reader(kind)
    reader.hits = None
    return reader


def _tables(run: Path) -> list[Path]:
    return sorted((run / "index/hits").glob("*.arrow"))


@pytest.fixture()
def indexed(tmp_path: Path) -> tuple[Path, np.ndarray]:
    _, x, _ = synthetic_run(tmp_path / "run", sum(SIZES), 16, SIZES)
    _index(tmp_path / "run")
    return tmp_path / "run", x


def test_hit_tables_give_the_parquet_rows_across_shard_boundaries(indexed) -> None:
    run, x = indexed
    assert len(_tables(run)) == len(SIZES)  # one per shard, written by the index stage
    bounds = np.cumsum([0, *SIZES])
    rows = np.array(sorted({*bounds[:-1], *(bounds[1:] - 1)}))
    rows = np.concatenate([rows, np.random.default_rng(0).permutation(len(x))])
    reader = Run(run).embed.reader("images")
    parquet = _parquet_reader(run)
    calls = []
    real = reader.hits.table
    reader.hits.table = lambda *a: calls.append(a) or real(*a)
    got = reader.read_rows(rows, FIELDS)
    assert calls  # read from the hit tables...
    assert got.equals(parquet.read_rows(rows, FIELDS))  # ...the same rows as the shards
    assert got.column("id").to_pylist() == [f"r{r}" for r in rows]
    ids = [f"r{r}" for r in (0, 7, 8, 60, 20, 99)] + ["nope"]
    assert reader.find_ids(ids) == parquet.find_ids(ids) == \
        {f"r{r}": r for r in (0, 7, 8, 60, 20, 99)}
    many = [f"r{r}" for r in range(len(x))][::-1]  # the vectorised path
    assert reader.find_ids(many) == {f"r{r}": r for r in range(len(x))}
    vectors = reader.read_vectors(COLUMN, 16, rows)  # vectors still come from the shards
    assert np.array_equal(vectors.astype(np.float32), x[rows])
    s = Searcher(run, COLUMN, device="cpu")
    for row in rows[:12]:
        hit = s.search_vector(x[row], "self", k=1).hits[0]
        assert (hit.row, hit.id) == (row, f"r{row}")


def test_caption_hits_carry_their_image_path(demo_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    _index(run)
    searcher = Searcher(run, "minilm_text", device="cpu")
    with_tables = searcher.search_text("a cat", k=8)
    searcher.reader.hits = None  # the Parquet path: image paths looked up by image id
    assert searcher.search_text("a cat", k=8).hits == with_tables.hits
    assert all(h.image for h in with_tables.hits)
    rows = np.arange(searcher.reader.offsets.total)
    got = Run(run).embed.reader("captions").read_rows(rows, CAPTION_META)
    assert got.drop_columns(["image"]).equals(
        _parquet_reader(run, "captions").read_rows(rows, CAPTION_META[:-1]))
    images = Run(run).embed.reader("images")
    want = images.read_rows(list(images.find_ids(got.column("image_id").to_pylist())
                                 .values()), ["id", "image"]).to_pydict()
    paths = dict(zip(want["id"], want["image"]))
    assert got.column("image").to_pylist() == [paths[i] for i in
                                               got.column("image_id").to_pylist()]
    assert Run(run).embed.reader("images").read_rows([0, 3], IMAGE_META).num_rows == 2


def test_missing_and_stale_hit_tables_are_rebuilt(indexed, tmp_path: Path) -> None:
    run, x = indexed
    hits = Run(run).embed.hits
    first = _tables(run)
    first[2].unlink()  # missing: read from the Parquet shard meanwhile
    assert Run(run).embed.hits.missing("images") == [2]
    s = Searcher(run, COLUMN, device="cpu")
    assert s.search_vector(x[22], "q", k=1).hits[0].id == "r22"
    _index(run)  # nothing new to index: only the missing table is written
    now = _tables(run)
    assert len(now) == len(SIZES) and set(first) - set(now) == {first[2]}
    assert Run(run).embed.hits.missing("images") == []
    # new shards appended (an add): tables for those alone
    synthetic_run(run, 30, 16, [10, 20], seed=1, append=True, first_id=sum(SIZES))
    assert Run(run).embed.hits.missing("images") == [len(SIZES), len(SIZES) + 1]
    _index(run)
    after = _tables(run)
    assert set(now) < set(after) and len(after) == len(SIZES) + 2
    reader = Run(run).embed.reader("images")
    assert reader.find_ids(["r100", "r129"]) == {"r100": 100, "r129": 129}
    # a stale table (its shard's digest is not the one it was made from) is ignored
    edit(run / "index/hits/manifest.json",
         lambda d: d["kinds"]["images"]["images/part-00000.parquet"].update(
             shard_digest="0" * 32), sealed=True)
    assert Run(run).embed.hits.missing("images") == [0]
    assert Run(run).embed.reader("images").read_rows([3], ["id"]).column(0)[0].as_py() == "r3"
    _index(run)
    assert Run(run).embed.hits.missing("images") == [] and hits.folder.is_dir()
    assert len(_tables(run)) == len(SIZES) + 2  # the stale one removed under the lock


def test_tampered_hit_tables_are_refused_then_rebuilt(indexed, capsys) -> None:
    run, x = indexed
    table = _tables(run)[2]  # rows 8 to 20
    data = bytearray(table.read_bytes())
    at = data.index(b"r15")  # its id (or image path): a byte of row 15
    data[at + 1] ^= 0x01  # r15 -> r05: still a valid string, a wrong one
    table.write_bytes(bytes(data))
    row = 15
    s = Searcher(run, COLUMN, device="cpu")
    assert s.search_vector(x[9], "q", k=1).hits[0].id == "r9"  # its other rows are sound
    with pytest.raises(FormatError, match="hit table .* corrupt"):
        s.search_vector(x[row], "q", k=1)
    try:  # the id lookup: refused, or (the id itself altered) not found; never wrong
        assert s.reader.find_ids(["r15", "r05"]) == {}
    except FormatError as e:
        assert "corrupt" in str(e)
    data[at + 1] ^= 0x01
    data[at + 1] ^= 0x80  # invalid UTF-8: refused the same way, never a traceback
    table.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="hit table .* corrupt"):
        Searcher(run, COLUMN, device="cpu").search_vector(x[row], "q", k=1)
    capsys.readouterr()
    assert main(["verify", "--run", str(run)]) == 2
    assert table.name in capsys.readouterr().out
    _index(run)  # rebuilt
    assert Run(run).verify() == []
    assert Searcher(run, COLUMN, device="cpu").search_vector(
        x[row], "q", k=1).hits[0].id == f"r{row}"
    # a link where a table belongs is refused, not followed
    table = _tables(run)[1]
    target = run.parent / "elsewhere.arrow"
    shutil.copy(table, target)
    table.unlink()
    os.symlink(target, table)
    with pytest.raises(Tampered):
        Searcher(run, COLUMN, device="cpu").search_vector(x[7], "q", k=1)
    table.unlink()
    shutil.copy(target, table)
    # an edited manifest (content not matching its digest) is one error naming it
    manifest = run / "index/hits/manifest.json"
    manifest.write_text(manifest.read_text().replace('"rows": 13', '"rows": 14'))
    with pytest.raises(FormatError, match="hit table manifest .* edited or is corrupt"):
        Run(run).embed.reader("images").read_rows([0], ["id"])
    # a forged entry naming a file outside the folder is refused before anything is read
    edit(manifest, lambda d: d["kinds"]["images"]["images/part-00000.parquet"].update(
        file="../../elsewhere.arrow"))
    with pytest.raises(FormatError, match="escapes"):
        Run(run).embed.reader("images").read_rows([0], ["id"])


def test_a_run_without_hit_tables_still_searches(indexed) -> None:
    run, x = indexed
    with_tables = Searcher(run, COLUMN, device="cpu")
    want = [with_tables.search_vector(x[r], "q", k=5).hits for r in (0, 20, 99)]
    shutil.rmtree(run / "index/hits")  # an index built by an older version
    s = Searcher(run, COLUMN, device="cpu")
    assert [s.search_vector(x[r], "q", k=5).hits for r in (0, 20, 99)] == want
    assert s.reader.find_ids(["r50"]) == {"r50": 50}
    assert Run(run).verify() == []
    _index(run)  # the index stage writes them for the run as it is
    assert len(_tables(run)) == len(SIZES)


def test_serve_warms_up_at_start(indexed) -> None:
    """serve's start runs a query per index and maps every hit table in the background,
    so its first queries pay neither first-use imports nor first reads."""
    from pipeline.serve import ServeConfig, Service
    from pipeline.serve_warm import warm

    run, _ = indexed
    service = Service(ServeConfig(run=str(run), device="cpu"))
    thread = warm(service)
    assert thread is not None
    thread.join(timeout=60)
    reader = service.searcher(COLUMN).reader
    assert len(reader.hits._tables) == len(SIZES)  # every table checked and mapped
    assert service.similar("r50", k=3).hits[0].id == "r50"
