"""The Ray engine on a real local Ray cluster (started once for the module): the same rows
and vectors as the local engine, through a dead actor, a killed driver, and runs started
with one engine and finished with the other."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from embeddings import Run, read_table, read_vectors
from embeddings.store import KINDS
from pipeline.cli import main
from pipeline.embed import run_embed
from tests.conftest import REPO, make_config

ray = pytest.importorskip("ray")
from pipeline.engine_ray import CRASH_ONCE_ENV  # noqa: E402 (needs ray)

COLUMNS = ("clip_image", "clip_text", "minilm_text")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local 2-CPU Ray cluster shared by the module's tests; its address."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _rows(run: Path) -> dict[str, list[str]]:
    return {k: sorted(read_table(run, k, ["id"]).column("id").to_pylist())
            for k in KINDS}


def _same_run(run: Path, reference: Path) -> None:
    """Exactly the reference's rows (no duplicate, no gap) and its vectors."""
    got, want = _rows(run), _rows(reference)
    assert got == want and all(len(v) == len(set(v)) for v in got.values())
    for column in COLUMNS:
        kind = "images" if column.endswith("_image") else "captions"
        order = np.argsort(read_table(run, kind, ["id"]).column("id").to_pylist())
        ref_order = np.argsort(read_table(reference, kind, ["id"]).column("id").to_pylist())
        np.testing.assert_allclose(read_vectors(run, column)[order],
                                   read_vectors(reference, column)[ref_order], atol=2e-3)


def _data(demo_run: Path) -> Path:
    return Path(Run(demo_run).embed.manifest().dataset["source"])


def _drop_blocks(run: Path, keep: int) -> None:
    """A run cut short: blocks from ``keep`` on and the manifest removed."""
    (run / "embed/manifest.json").unlink()
    for kind in KINDS:
        for path in sorted((run / "embed" / kind).glob("part-*.parquet"))[keep:]:
            path.unlink()


def test_ray_engine_gives_the_local_rows_and_vectors(cluster, demo_run, encoder_specs,
                                                     tmp_path) -> None:
    cfg = make_config(_data(demo_run), tmp_path / "run", encoder_specs, engine="ray")
    result = run_embed(cfg)
    assert result.new_shards == len(Run(demo_run).embed.manifest().shards["images"]) > 1
    _same_run(tmp_path / "run", demo_run)
    assert run_embed(cfg).nothing_to_do


def test_a_dead_actor_is_replaced_and_its_block_redone(cluster, demo_run, encoder_specs,
                                                       tmp_path, monkeypatch) -> None:
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))  # the first block's actor exits mid-block
    run_embed(make_config(_data(demo_run), tmp_path / "run", encoder_specs, engine="ray"))
    assert marker.exists()
    _same_run(tmp_path / "run", demo_run)


def test_a_killed_driver_is_resumed_by_the_same_command(cluster, demo_run, tiny_clip,
                                                        tmp_path, capsys) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline", "embed", "--config",
           str(REPO / "configs/offline.toml"), "--data", str(_data(demo_run)), "--run",
           str(run), "--model", tiny_clip, "--shard-size", "20", "--batch-size", "16",
           "--device", "cpu", "--no-progress", "--engine", "ray", "--ray-address", cluster]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = run / "embed/captions"
    deadline = time.time() + 120
    while not list(first.glob("part-*.parquet")) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(first.glob("part-*.parquet")) and not (run / "embed/manifest.json").exists()
    assert main(cmd[3:]) == 0  # the same command line, rerun (in this process: faster)
    assert "new blocks" in capsys.readouterr().out
    _same_run(run, demo_run)


def test_each_engine_finishes_the_others_runs(cluster, demo_run, encoder_specs,
                                              tmp_path) -> None:
    cfg = make_config(_data(demo_run), tmp_path / "run", encoder_specs)
    shutil.copytree(demo_run, tmp_path / "run")
    _drop_blocks(tmp_path / "run", keep=1)  # started locally ...
    assert run_embed(replace(cfg, engine="ray")).new_shards > 0  # ... finished with Ray
    _same_run(tmp_path / "run", demo_run)
    _drop_blocks(tmp_path / "run", keep=2)  # Ray's blocks cut short ...
    assert run_embed(cfg).new_shards > 0  # ... finished locally
    _same_run(tmp_path / "run", demo_run)


def test_ray_reads_tar_shards_over_http_in_its_tasks(cluster, encoder_specs, tmp_path) -> None:
    """No filesystem shared for images: the tasks stream the shards from a loopback HTTP
    server; the run equals a local-engine run of the same shards read from disk."""
    from scripts import img2dataset_corpus as corpus_script
    from tests._remote_fixtures import http_server

    corpus_script.write(corpus_script.make(2, 6, (64, 48), damaged=False), tmp_path / "wds",
                        damaged=False)
    local = make_config(tmp_path / "x", tmp_path / "local", encoder_specs)
    local = replace(local, data=replace(local.data, path=str(tmp_path / "wds/{00000..00001}.tar")))
    run_embed(local)
    with http_server(tmp_path / "wds") as url:
        remote = replace(local, run=str(tmp_path / "ray"), engine="ray", data=replace(
            local.data, path=f"{url}/{{00000..00001}}.tar"))
        assert run_embed(remote).new_shards == 2
    _same_run(tmp_path / "ray", tmp_path / "local")
    assert Run(tmp_path / "ray").embed.manifest().sidecar["embedded"] == 12


def test_without_ray_the_engine_fails_at_once_with_the_install_command(
        tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["embed", "--run", str(tmp_path), "--engine", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and 'pip install "ray[data]"' in err, err
    assert not (tmp_path / "embed").exists()
