"""One line for every mistake: bad places, missing packages, wrong parameters, hostile
manifests, an unreachable Ray cluster, out of memory, full disks and exhausted inodes
(on a real tmpfs when the tests may mount one), and the HTTP layer's error mapping."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from embeddings.store import Run
from pipeline.cli import main
from pipeline.config import IndexConfig
from pipeline.index import run_index
from tests._serve_fixtures import running, service
from tests._tamper import cli_fails
from tests.conftest import MINILM, REPO, small_demo


@pytest.fixture(autouse=True)
def _fresh_logging() -> None:
    import logging

    logging.getLogger().handlers.clear()


@pytest.fixture
def run(tmp_path: Path, demo_run: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(demo_run, dst)
    return dst


def _config(tmp_path: Path, tiny_clip: str, data: Path | None = None, extra: str = "") -> str:
    path = tmp_path / "c.toml"
    path.write_text((f'[data]\npath = "{data}"\n' if data else "")
                    + '[embed]\nshard_size = 20\nworkers = 0\ndevice = "cpu"\n'
                    f'[[encoders]]\nname = "clip"\ntype = "open_clip"\nmodel = "{tiny_clip}"\n'
                    f'[[encoders]]\nname = "minilm"\ntype = "sentence_transformers"\n'
                    f'model = "{MINILM}"\n' + extra)
    return str(path)


# ------------------------------------------------------------------ places

@pytest.mark.parametrize("command", ["embed", "index", "heads", "search", "verify",
                                     "eval-retrieval"])
@pytest.mark.parametrize("place", ["under a file", "/proc", "/sys"])
def test_run_in_a_place_that_cannot_hold_one(tmp_path: Path, tiny_clip: str, command: str,
                                             place: str, capsys: pytest.CaptureFixture) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    target = {"under a file": afile / "run", "/proc": Path("/proc/no-such/run"),
              "/sys": Path("/sys/mmemb-run")}[place]
    data = small_demo(tmp_path / "data", per_class=1)
    argv = [command, "--run", str(target), "--config", _config(tmp_path, tiny_clip, data)]
    if command == "search":
        argv.insert(1, "a cat")
    if command == "embed":
        argv.append("--no-progress")
    cli_fails(capsys, *argv, match=str(target) if place != "/sys" else "")


@pytest.mark.parametrize("out", ["/sys/mmemb.parquet", "/proc/version/x.parquet"])
def test_outputs_in_unwritable_places(run: Path, tmp_path: Path, out: str,
                                      capsys: pytest.CaptureFixture) -> None:
    from pipeline.config import HeadsConfig
    from pipeline.heads import run_heads

    run_heads(HeadsConfig(run=str(run), inputs=("minilm_text",), heads=("logistic",),
                          multilabel="", multitask=()))
    head = next((run / "heads/models").glob("*.json"))
    cli_fails(capsys, "predict", "--run", str(run), "--head", str(head), "--output", out,
              match="cannot write")
    cli_fails(capsys, "tiny-model", "--out", out.removesuffix(".parquet"),
              match="cannot write")


def test_a_missing_package_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = small_demo(tmp_path / "data", per_class=1)
    config = tmp_path / "c.toml"
    config.write_text(f'[data]\npath = "{data}"\n[[encoders]]\nname = "t"\n'
                      'type = "sentence_transformers"\nmodel = "pkg:no_such_model_pkg"\n')
    cli_fails(capsys, "embed", "--config", str(config), "--run", str(tmp_path / "r"),
              "--no-progress", match="no installed Python package provides module "
              "'no_such_model_pkg'")
    config.write_text(config.read_text().replace("no_such_model_pkg", "json"))
    cli_fails(capsys, "embed", "--config", str(config), "--run", str(tmp_path / "r"),
              "--no-progress", match="does not ship a model")


@pytest.mark.parametrize("params", ['[heads.params.logistic]\ntol = "tight"\n',
                                    '[heads.params.mlp]\nhidden = -3\n',
                                    '[heads.params.mlp]\nhidden = "wide"\n'])
def test_wrong_head_parameters(run: Path, tmp_path: Path, tiny_clip: str, params: str,
                               capsys: pytest.CaptureFixture) -> None:
    head = params.split(".")[2].split("]")[0]
    config = _config(tmp_path, tiny_clip, extra=params)
    cli_fails(capsys, "heads", "--run", str(run), "--config", config, "--heads", head,
              "--inputs", "minilm_text", "--multilabel", "", "--multitask", "",
              match=f"heads.params.{head}")
    assert not (run / "heads/models").exists()


@pytest.mark.parametrize("n", ["0", "-5"])
def test_recall_queries_must_be_positive(run: Path, n: str,
                                         capsys: pytest.CaptureFixture) -> None:
    run_index(IndexConfig(run=str(run)))
    manifest = (run / "index/manifest.json").read_bytes()
    cli_fails(capsys, "index", "--run", str(run), "--recall-queries", n, "--rebuild",
              match="recall_queries")
    assert (run / "index/manifest.json").read_bytes() == manifest
    assert b"NaN" not in manifest


def test_deeply_nested_json_lines(tmp_path: Path, tiny_clip: str,
                                  capsys: pytest.CaptureFixture) -> None:
    image = REPO / "data/demo/images/food/bread.png"
    data = tmp_path / "m.jsonl"
    good = json.dumps({"image": str(image), "caption": "bread"})
    data.write_text(f"{good}\n" + "[" * 100_000 + "]" * 100_000 + "\n"
                    + '{"image": "' + str(image) + '", "caption": "' + "[" * 50_000 + '"}\n')
    config = _config(tmp_path, tiny_clip, data)
    assert main(["embed", "--config", config, "--run", str(tmp_path / "r"), "--root", "/",
                 "--no-progress"]) == 0
    rejects = (tmp_path / "r/embed/rejects.jsonl").read_text()
    assert "nested too deeply" in rejects
    coco = tmp_path / "coco.json"
    coco.write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
    cli_fails(capsys, "embed", "--config", config, "--data", str(coco), "--run",
              str(tmp_path / "r2"), "--no-progress", match="nested too deeply")


def test_an_unreachable_ray_cluster_fails_within_seconds(run: Path, tmp_path: Path,
                                                         tiny_clip: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("ray")
    data = small_demo(tmp_path / "data", per_class=1)
    t0 = time.monotonic()
    cli_fails(capsys, "embed", "--config", _config(tmp_path, tiny_clip, data), "--run",
              str(tmp_path / "r"), "--engine", "ray", "--ray-address", "127.0.0.1:1",
              "--no-progress", match="cannot reach the Ray cluster at '127.0.0.1:1'")
    assert time.monotonic() - t0 < 10


# ------------------------------------------------------------------ out of memory

@pytest.mark.parametrize("command, target, hint", [
    ("embed", "pipeline.embed.run_embed", "--batch-size"),
    ("index", "pipeline.index.run_index", "--memory-budget"),
    ("heads", "pipeline.heads.run_heads", "--heads"),
    ("search", "pipeline.search.search", "--mmap"),
    ("eval-retrieval", "pipeline.evaluate.run_retrieval_eval", "--split"),
])
def test_out_of_memory_names_the_stage_and_what_to_lower(
        run: Path, command: str, target: str, hint: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    import importlib

    module, name = target.rsplit(".", 1)

    def exhausted(*a: object, **k: object) -> None:
        raise MemoryError("Unable to allocate 96.0 GiB for an array")

    monkeypatch.setattr(importlib.import_module(module), name, exhausted)
    argv = [command, "--run", str(run)] + (["a cat"] if command == "search" else [])
    line = cli_fails(capsys, *argv, match=f"out of memory in `{command}`")
    assert hint in line


def test_gpu_out_of_memory_is_one_line(run: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    import torch

    import pipeline.index

    def exhausted(*a: object, **k: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(pipeline.index, "run_index", exhausted)
    cli_fails(capsys, "index", "--run", str(run), match="out of GPU memory in `index`")


# ------------------------------------------------------------------ full disks

def _tmpfs(path: Path, size: str, inodes: int | None = None) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    return done


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 32 MiB tmpfs (needs root, else the test is skipped; the injected-ENOSPC
    tests below run everywhere)."""
    mount = tmp_path / "disk"
    if os.geteuid() != 0 or not _tmpfs(mount, "32m"):
        pytest.skip("cannot mount a tmpfs here (needs root): injected-ENOSPC tests cover it")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> None:
    """Leave no free block on ``disk``."""
    for name, chunk in (("filler", 1 << 16), ("filler2", 512)):
        with open(disk / name, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC


def test_full_disk_in_every_stage(small_disk: Path, run: Path, tmp_path: Path,
                                  tiny_clip: str, capsys: pytest.CaptureFixture) -> None:
    """Lock writes included: each stage on a full disk is one line, and once space is
    freed the same command finishes."""
    from pipeline.config import HeadsConfig
    from pipeline.heads import run_heads

    run_heads(HeadsConfig(run=str(run), inputs=("minilm_text",), heads=("logistic",),
                          multilabel="", multitask=()))
    head = next((run / "heads/models").glob("*.json"))
    on_disk = small_disk / "run"
    shutil.copytree(run, on_disk, ignore=shutil.ignore_patterns(".lock"))
    shutil.rmtree(on_disk / "heads")
    data = small_demo(tmp_path / "data", per_class=1)
    config = _config(tmp_path, tiny_clip, data)
    _fill(small_disk)
    heads = ["heads", "--run", str(on_disk), "--config", config, "--heads", "logistic",
             "--inputs", "minilm_text", "--multilabel", "", "--multitask", ""]
    commands = [["index", "--run", str(on_disk), "--config", config], heads,
                ["embed", "--run", str(small_disk / "new"), "--config", config,
                 "--no-progress"],
                ["predict", "--run", str(run), "--head", str(head), "--output",
                 str(small_disk / "p.parquet")],
                ["tiny-model", "--out", str(small_disk / "tiny")]]
    for argv in commands:
        cli_fails(capsys, *argv, match="no space left on device")
    assert not list(small_disk.rglob("*.tmp"))
    (small_disk / "filler").unlink()
    for argv in commands:
        assert main(argv) == 0, argv


def test_no_inodes_left(tmp_path: Path, run: Path, capsys: pytest.CaptureFixture) -> None:
    mount = tmp_path / "disk"
    if os.geteuid() != 0 or not _tmpfs(mount, "64m", inodes=64):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        on_disk = mount / "run"
        shutil.copytree(run / "embed", on_disk / "embed")
        n = 0
        while True:  # use up the inodes
            try:
                (mount / f"f{n}").touch()
            except OSError:
                break
            n += 1
        cli_fails(capsys, "index", "--run", str(on_disk), match="no space left on device")
        for i in range(n):
            (mount / f"f{i}").unlink()
        assert main(["index", "--run", str(on_disk)]) == 0
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_injected_disk_full_on_the_lock_write(run: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    from embeddings.store import lock

    def full(*a: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock.os, "pwrite", full)
    cli_fails(capsys, "index", "--run", str(run), match="no space left on device while "
              f"writing {run}/index/.lock")
    monkeypatch.undo()
    with Run(run).lock("index"):  # the descriptor was closed, the lock released
        pass


# ------------------------------------------------------------------ serve

def test_serve_without_a_writable_cache_still_shows_thumbnails(demo_run: Path,
                                                              tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    run_index(IndexConfig(run=str(run)))
    (run / "serve").mkdir()
    (run / "serve/thumbs").write_text("a file where the cache folder belongs")
    (run / "serve/tmp").write_text("and another")
    image_id = Run(run).embed.read_table("images", ["id"]).column(0)[0].as_py()
    with running(__import__("pipeline.serve_app", fromlist=["x"]).create_app(service(run))) \
            as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.get("/api/thumb", params={"id": image_id})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        png = (REPO / "data/demo/images/food/bread.png").read_bytes()
        up = c.post("/api/search/image", files={"file": ("q.png", png)})
        assert up.status_code == 200


def test_http_maps_only_user_errors_to_4xx(demo_run: Path, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.serve_app import INTERNAL, create_app

    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    run_index(IndexConfig(run=str(run)))
    svc = service(run)

    def bug(*a: object, **k: object) -> None:
        raise ValueError("internal detail: /secret/path at line 42")

    svc.search_text = bug  # type: ignore[method-assign]
    with caplog.at_level("ERROR"), running(create_app(svc)) as url, \
            httpx.Client(base_url=url, timeout=60) as c:
        r = c.get("/api/search", params={"q": "a cat"})
        assert r.status_code == 500 and r.json() == {"detail": INTERNAL}
        assert "secret" not in r.text
        assert c.get("/api/search", params={"q": "a cat", "k": 0}).status_code == 422
        assert c.get("/api/similar", params={"id": "nope"}).status_code == 404
    assert "internal detail: /secret/path" in caplog.text
