"""Run-directory integrity: locks, checksums, confinement, one clean error per bad file."""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embeddings import store
from embeddings.errors import FormatError, Locked
from embeddings.heads import Task, load_head, make_head, save_head
from embeddings.store import Run
from pipeline.cli import main
from pipeline.config import DataConfig, EmbedConfig, IndexConfig
from pipeline.embed import run_embed
from pipeline.index import run_index
from tests._tamper import edit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_logging() -> None:
    """``main`` binds log handlers to the captured stderr of its test; start clean."""
    import logging

    logging.getLogger().handlers.clear()


@pytest.fixture
def run(tmp_path: Path, demo_run: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(demo_run, dst)
    return dst


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _cfg(run: Path, encoder_specs: tuple, **kw: object) -> EmbedConfig:
    source = json.loads((run / "embed/manifest.json").read_text())["dataset"]["source"]
    base = dict(device="cpu", batch_size=16, workers=0, shard_size=20, progress=False)
    base.update(kw)
    return EmbedConfig(data=DataConfig(path=source), encoders=encoder_specs, run=str(run), **base)


def _ids(run: Path) -> dict[str, list[str]]:
    return {k: Run(run).embed.read_table(k, ["id"]).column("id").to_pylist() for k in store.KINDS}


def test_second_writer_is_refused_and_stale_lock_taken_over(tmp_path: Path) -> None:
    code = ("import sys, time; from embeddings.store import Run\n"
            "with Run(sys.argv[1]).lock('embed'):\n    print('locked', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(Locked, match=f"being written by process {holder.pid} since"):
            with Run(tmp_path).lock("embed"):
                pass
        with Run(tmp_path).lock("index"):  # other stages are not blocked
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with Run(tmp_path).lock("embed"):  # the dead holder's lock is taken over
        pass


def test_two_embed_processes_on_one_run(tmp_path: Path, demo_run: Path) -> None:
    """Two real CLI runs at once: one embeds, the other stops with the lock message."""
    source = json.loads((demo_run / "embed/manifest.json").read_text())["dataset"]["source"]
    config = tmp_path / "c.toml"
    model = json.loads((demo_run / "embed/config.json").read_text())["columns"]["clip_image"]
    config.write_text(f'[data]\npath = "{source}"\n[embed]\nshard_size = 20\n[[encoders]]\n'
                      f'name = "clip"\ntype = "open_clip"\nmodel = '
                      f'"{model["provenance"]["model"]}"\n')
    cmd = [sys.executable, "-m", "pipeline", "embed", "--config", str(config), "--run",
           str(tmp_path / "run"), "--no-progress", "--workers", "0", "--device", "cpu"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    if codes == [0, 0]:  # the first finished before the second took the lock: still safe
        assert all("nothing to do" in o[0] or "image rows" in o[0] for o in outs)
    else:
        assert codes == [0, 2]
        assert any("is being written by process" in o[1] for o in outs)
    ids = _ids(tmp_path / "run")
    assert len(ids["images"]) == len(set(ids["images"])) > 0


def test_flipped_shard_byte_is_detected_named_and_redone(run: Path, encoder_specs: tuple,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    before = {c: Run(run).embed.read_vectors(c) for c in ("clip_image", "minilm_text")}
    shard = run / "embed/images/part-00001.parquet"
    _flip(shard)
    with pytest.raises(FormatError, match="part-00001.parquet is corrupt"):
        Run(run).embed.read_vectors("clip_image")
    problems = Run(run).verify()
    assert len(problems) == 1 and "part-00001" in problems[0]
    with caplog.at_level("WARNING"):
        run_embed(_cfg(run, encoder_specs))
    assert "re-embedding block 1" in caplog.text
    for c, v in before.items():
        assert np.array_equal(Run(run).embed.read_vectors(c), v)
    assert Run(run).verify() == []
    assert main(["verify", "--run", str(run)]) == 0


def test_truncated_shard_is_named_and_redone(run: Path, encoder_specs: tuple) -> None:
    shard = run / "embed/captions/part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    ids = None
    with pytest.raises(FormatError, match="captions/part-00000.parquet is corrupt"):
        ids = _ids(run)
    run_embed(_cfg(run, encoder_specs))
    ids = _ids(run)
    assert len(ids["captions"]) == len(set(ids["captions"])) > 0


@pytest.mark.parametrize("name", ["embed/manifest.json", "embed/config.json"])
def test_corrupt_json_is_one_error_naming_the_file(run: Path, encoder_specs: tuple, name: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    path = run / name
    path.write_text(path.read_text()[:40])
    assert main(["index", "--run", str(run)]) == 2 if name.endswith("manifest.json") else True
    if name.endswith("config.json"):
        with pytest.raises(FormatError, match=f"{path}"):
            run_embed(_cfg(run, encoder_specs))
    else:
        err = capsys.readouterr().err
        assert str(path) in err and err.count("\n") == 1
    path.write_text("[1, 2]")
    with pytest.raises(FormatError, match="corrupt"):
        Run(run).embed.manifest() if name.endswith("manifest.json") \
            else run_embed(_cfg(run, encoder_specs))


def test_index_file_corruption(run: Path, capsys: pytest.CaptureFixture) -> None:
    run_index(IndexConfig(run=str(run)))
    entry = Run(run).index.entries()["clip_image"]
    path = run / "index" / entry.file
    _flip(path)
    capsys.readouterr()
    assert main(["search", "a cat", "--run", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert entry.file in err and "corrupt" in err and err.count("\n") == 1
    results = {r.column: r for r in run_index(IndexConfig(run=str(run)))}
    assert results["clip_image"].action == "rebuilt"
    assert "corrupt" in results["clip_image"].note
    assert results["minilm_text"].action == "unchanged"
    assert Run(run).verify() == []
    manifest = run / "index/manifest.json"
    manifest.write_text(manifest.read_text()[:50])
    assert main(["search", "a cat", "--run", str(run), "--device", "cpu"]) == 2
    assert str(manifest) in capsys.readouterr().err


def test_paths_from_run_files_stay_inside(run: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    run_index(IndexConfig(run=str(run)))
    manifest = run / "index/manifest.json"
    edit(manifest, lambda d: d["indexes"]["clip_image"].update(file="../../victim.txt"))
    with pytest.raises(FormatError, match="escapes"):
        run_index(IndexConfig(run=str(run)))
    assert main(["search", "x", "--run", str(run), "--device", "cpu"]) == 2
    run_index(IndexConfig(run=str(run), rebuild=True))  # the remedy: the names are dropped
    assert victim.read_text() == "keep me"
    embed = run / "embed/manifest.json"
    edit(embed, lambda d: d["shards"]["images"][0].update(file="../../victim.txt"))
    with pytest.raises(FormatError, match="escapes"):
        Run(run).embed.read_vectors("clip_image")
    assert victim.read_text() == "keep me"


def _head(seed: int, hidden: int) -> object:
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(60, 4)).astype(np.float32), rng.integers(0, 2, 60)
    head = make_head("mlp", [Task("label", ("a", "b"))], [4], hidden=hidden, max_epochs=2)
    return head.fit([x], [y], [x], [y])


def test_head_weights_and_description_are_one_unit(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    col = store.Column("c", "images", "e", "image", "float16",
                       store.Provenance(type="t", model="m", dim=4, weights_sha256="1" * 64))
    path = tmp_path / "models/mlp.json"
    save_head(_head(0, 8), path, [("c", col)])
    real = store.trained.atomic_write_json

    def killed(*a: object, **k: object) -> None:
        raise KeyboardInterrupt  # killed between the weights and the description

    monkeypatch.setattr(store.trained, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        save_head(_head(1, 16), path, [("c", col)])
    monkeypatch.setattr(store.trained, "atomic_write_json", real)
    head, meta = load_head(path)  # the old unit, whole
    assert head.dims == (4,)
    assert meta["params"]["hidden"] == [8]
    weights = tmp_path / "models" / meta["weights"]["file"]
    _flip(weights)
    with pytest.raises(FormatError, match="head weights .* is corrupt"):
        load_head(path)
    path.write_text(path.read_text()[:30])
    with pytest.raises(FormatError, match="head description"):
        load_head(path)


def test_disk_full_is_one_error_and_resume_is_clean(run: Path, encoder_specs: tuple,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    want, cfg = _ids(run), _cfg(run, encoder_specs)
    shutil.rmtree(run / "embed")
    real, calls = Path.write_bytes, []

    def full_after_two(self: Path, data: bytes) -> int:
        calls.append(self)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_after_two)
    with pytest.raises(store.DiskFull, match="no space left on device while writing .*part-"):
        run_embed(cfg)
    monkeypatch.setattr(Path, "write_bytes", real)
    assert not list((run / "embed").rglob("*.tmp"))
    run_embed(cfg)
    assert _ids(run) == want


def test_run_files_follow_the_umask(run: Path) -> None:
    run_index(IndexConfig(run=str(run)))
    old = os.umask(0o027)
    try:
        store.atomic_write_json(run / "x.json", {})
        assert (run / "x.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    modes = {p.stat().st_mode & 0o777 for p in run.rglob("*") if p.is_file()
             and p.name != ".lock" and p.name != "x.json"}
    assert modes == {0o666 & ~old}


def test_stale_temporary_files_are_removed(run: Path, encoder_specs: tuple) -> None:
    stale = run / "embed/images/.part-00001.parquet.abc123.tmp"
    stale.write_bytes(b"half")
    run_embed(_cfg(run, encoder_specs))
    assert not stale.exists()


def test_wrong_kinds_of_paths_and_devices(run: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["index", "--run", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["embed", "--run", str(tmp_path / "r"), "--device", "bogus"]) == 2
    assert "unknown device 'bogus'" in capsys.readouterr().err
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert main(["heads", "--config", str(empty), "--run", str(run), "--heads", "logistic",
                 "--inputs", "minilm_text", "--multilabel", "", "--multitask", ""]) == 0
    capsys.readouterr()
    head = next((run / "heads/models").glob("logistic-*.json"))
    assert main(["predict", "--run", str(run), "--head", str(head), "--output",
                 str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_interrupt_reports_blocks_kept(run: Path, encoder_specs: tuple,
                                       monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(run, encoder_specs)
    shutil.rmtree(run / "embed")
    stage = importlib.import_module("pipeline.unit")

    real, n = stage.write_block, []

    def interrupt_third(*a: object, **k: object) -> object:
        n.append(1)
        if len(n) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(stage, "write_block", interrupt_third)
    with caplog.at_level("WARNING"), pytest.raises(KeyboardInterrupt):
        run_embed(cfg)
    assert "the 2 block(s) finished in this run are kept" in caplog.text


def test_older_schema_is_refused_with_a_clear_error(run: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    path = run / "embed/manifest.json"
    data = json.loads(path.read_text())
    data["schema_version"] = 1
    path.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["index", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "schema version 1; this version reads 2" in err and err.count("\n") == 1
