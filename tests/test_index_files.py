"""The files an index build writes besides the ``.faiss`` file (on-disk inverted lists,
the recall state, build scratch folders, cached filter bitmaps) get the same protection:
a link in their place is refused (one line naming it) and nothing outside the run is read,
an altered one is caught, and what a killed build left is listed by ``verify`` and removed
by the next index run."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from embeddings.store import Run, Tampered
from embeddings.store import index as store_index
from pipeline.cli import main
from pipeline.config import IndexConfig
from pipeline.index import open_index, run_index
from pipeline.search import Searcher
from tests._scale_fixtures import COLUMN, RARE, synthetic_run
from tests._tamper import cli_fails, fingerprint

BUDGET_GB = 6 / 1024  # 20,000 x 32 under 6 MiB: the SQ8 lists go on disk
FACTORY = "IVF32,SQ8"


@pytest.fixture(autouse=True)
def _fresh_logging() -> None:
    import logging

    logging.getLogger().handlers.clear()


@pytest.fixture(scope="module")
def ondisk_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ondisk") / "run"
    synthetic_run(run, 20_000, 32, 5_000)
    _index(run)
    return run


def _index(run: Path, **kw: object) -> list:
    return run_index(IndexConfig(run=str(run), memory_budget_gb=BUDGET_GB, factory=FACTORY,
                                 recall_queries=30, progress=False, **kw))


@pytest.fixture
def case(tmp_path: Path, ondisk_run: Path) -> Iterator[dict]:
    """A copy of the run with its on-disk index, and a decoy folder beside it whose
    digests must not change."""
    run = tmp_path / "run"
    shutil.copytree(ondisk_run, run)
    entry = Run(run).index.entries()[COLUMN]
    assert entry.lists and entry.truth and entry.stats["on_disk"]
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "notes.txt").write_text("keep me")
    before = fingerprint(decoy)
    yield {"run": run, "decoy": decoy, "entry": entry, "tmp": tmp_path}
    assert fingerprint(decoy) == before  # nothing outside the run was written or deleted


def _files(case: dict) -> dict[str, Path]:
    run, entry = case["run"], case["entry"]
    filters = sorted((run / "index/filters").glob("images.*"))
    assert filters  # the index stage cached the split bitmaps
    return {"lists": run / "index" / entry.lists["file"],
            "truth": run / "index" / entry.truth["file"], "filter": filters[0]}


def _verify(capsys: pytest.CaptureFixture, run: Path) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["verify", "--run", str(run)])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("what", ["lists", "truth", "filter"])
def test_a_linked_index_file_is_refused(case: dict, what: str,
                                        capsys: pytest.CaptureFixture) -> None:
    """A link to a byte-identical copy outside: following it would pass every digest."""
    run = case["run"]
    path = _files(case)[what]
    (case["tmp"] / "outside").mkdir()
    outside = case["tmp"] / "outside" / ("copy-" + path.name)
    shutil.copy(path, outside)
    path.unlink()
    path.symlink_to(outside)
    before = fingerprint(outside.parent)
    code, out = _verify(capsys, run)
    assert code == 2 and f"{path} is a symbolic link" in out
    if what != "filter":  # the index stage refuses it, never rebuilds over it
        cli_fails(capsys, "index", "--run", str(run), "--memory-budget", str(BUDGET_GB),
                  "--factory", FACTORY, "--no-progress", match=f"{path} is a symbolic link")
    if what == "lists":
        with pytest.raises(Tampered, match="symbolic link"):
            open_index(run, COLUMN)
    if what == "filter":
        q = np.ones(32, np.float32) / np.sqrt(32)
        split = "train" if "train" in _split_of(run, path) else "test"
        with pytest.raises(Tampered, match="symbolic link"):
            Searcher(run, COLUMN, device="cpu").search_vector(q, "q", k=5, split=split)
    assert fingerprint(outside.parent) == before
    path.unlink()  # the remedy the message names: remove it
    _index(run)
    code, out = _verify(capsys, run)
    assert code == 0 and "leftover" not in out, out


def _split_of(run: Path, path: Path) -> str:
    """Which split bitmap ``path`` caches (its name is a digest of the filter)."""
    for split in ("train", "test"):
        stem = Run(run).filters._stem("images", ["mask", split, None])
        if path.name.startswith(stem + "."):
            return split
    return "values"


@pytest.mark.parametrize("what", ["lists", "truth"])
def test_an_altered_index_file_is_caught_and_rebuilt(case: dict, what: str,
                                                     capsys: pytest.CaptureFixture) -> None:
    run = case["run"]
    path = _files(case)[what]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the digest tells
    path.write_bytes(bytes(data))
    code, out = _verify(capsys, run)
    assert code == 2 and f"{path} is corrupt (its checksum" in out
    if what == "lists":
        with pytest.raises(Exception, match="checksum"):
            open_index(run, COLUMN)
    (result,) = _index(run)
    assert result.action == "rebuilt" and "corrupt" in result.note
    assert not path.exists()
    code, out = _verify(capsys, run)
    assert code == 0 and "leftover" not in out, out
    index, entry = open_index(run, COLUMN)
    assert index.ntotal == 20_000 and entry.lists


def test_a_killed_build_leaves_nothing_for_long(case: dict, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """Killed between its files and the manifest entry (lists, recall state and index
    orphaned), or mid-build (a scratch folder of part files, a temporary file), with a
    bitmap of shards the run no longer has: verify lists each, the next run removes them."""
    run = case["run"]
    real = store_index.IndexFiles.write_entries

    def killed(self: object, entries: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(store_index.IndexFiles, "write_entries", killed)
    with pytest.raises(KeyboardInterrupt):
        _index(run, rebuild=True)
    monkeypatch.setattr(store_index.IndexFiles, "write_entries", real)
    named = {case["entry"].file, case["entry"].lists["file"], case["entry"].truth["file"]}
    orphans = sorted(p for p in (run / "index").iterdir()
                     if p.is_file() and p.name.endswith((".faiss", ".ivfdata", ".truth.npz"))
                     and p.name not in named)
    assert {p.suffix for p in orphans} == {".faiss", ".ivfdata", ".npz"}
    scratch = run / "index" / ".build-killed"
    scratch.mkdir()
    (scratch / "part-1.lists").write_bytes(b"MMEPART1" + bytes(100))
    tmp = run / "index" / f".{COLUMN}.0123abcd.faiss.xyz.tmp"
    tmp.write_bytes(b"half")
    stale = _files(case)["filter"].with_name("images.0123456789abcdef01234567.feed")
    stale.write_bytes(os.urandom(64))  # a bitmap no current shard list matches
    code, out = _verify(capsys, run)
    assert code == 0, out
    for path in (*orphans, scratch, tmp, stale):
        assert f"leftover: {path}" in out, (path, out)
    (result,) = _index(run)
    assert result.action == "unchanged"
    for path in (*orphans, scratch, tmp, stale):
        assert not path.exists(), path
    assert Run(run).report().leftovers == []
    files = {p.name for p in (run / "index").iterdir() if p.is_file()} - {".lock"}
    assert files == {"manifest.json", *named}
    q = np.ones(32, np.float32) / np.sqrt(32)
    hits = Searcher(run, COLUMN, device="cpu").search_vector(q, "q", k=10, label=RARE).hits
    assert len(hits) == 10 and {h.label for h in hits} == {RARE}


def test_a_build_task_writes_nothing_once_its_driver_is_gone(tmp_path: Path) -> None:
    """What a Ray task of a killed ``index --engine ray`` does: it asks for the driver's
    lock (the lease) before each part file, and stops once the lock is released."""
    from dataclasses import replace
    from functools import partial

    from embeddings import index as ix
    from embeddings.index.jobs import DriverGone
    from embeddings.store import still_held

    run, _, _ = synthetic_run(tmp_path / "run", 4_000, 16, 1_000)
    nlist, cs = ix.describe("IVF16,Flat", 16)
    plan = ix.plan_build("IVF16,Flat", 4_000, 16, 2**30, 4_000 * (cs + 8), nlist, cs, True)
    with run.lock("index") as lock:
        job = ix.BuildJob(run.embed.source(COLUMN), plan, tmp_path / "a", n_queries=10,
                          alive=partial(still_held, run.index.dir, lock.token))
        assert ix.BUILDERS["out_of_core"](job).ntotal == 4_000
        assert list((tmp_path / "a").iterdir())  # parts, while the driver holds the lock
    with pytest.raises(DriverGone, match="driver of this index build is gone"):
        ix.BUILDERS["out_of_core"](replace(job, scratch=tmp_path / "b"))
    assert not (tmp_path / "b").exists()
