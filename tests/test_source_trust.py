"""Image sources under the untrusted-run rule (issues 16 and 17 together): a run not
sealed here never makes ``serve`` read a file or fetch a URL the user did not name, the
shard cache in the run is checked like every other run file, and the local files' one
confinement rule holds at open time too."""

from __future__ import annotations

import functools
import io
import os
import shutil
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from embeddings.errors import FormatError, InputError
from embeddings.images import ImageError
from embeddings.sources import FileSource, OutsideRoot
from embeddings.store import Run, read_table
from pipeline.config import DataConfig, EmbedConfig
from pipeline.embed import run_embed
from pipeline.serve import Refused, ServeConfig, Service
from scripts import img2dataset_corpus as corpus_script
from tests._remote_fixtures import Handler, http_server
from tests._tamper import edit, fingerprint


@pytest.fixture(scope="module")
def tar_run(tmp_path_factory: pytest.TempPathFactory, encoder_specs) -> Iterator[tuple]:
    """Two tar shards served over loopback HTTP and a sealed run embedded from them
    (tiny CLIP only); yields (run, shards folder, base URL)."""
    base = tmp_path_factory.mktemp("trust")
    corpus_script.write(corpus_script.make(2, 4, (64, 48), damaged=False), base / "tars",
                        damaged=False)
    with http_server(base) as url:
        cfg = EmbedConfig(data=DataConfig(path=f"{url}/tars/{{00000..00001}}.tar"),
                          encoders=encoder_specs[:1], run=str(base / "run"), device="cpu",
                          batch_size=8, workers=0, progress=False)
        run_embed(cfg)
        yield base / "run", base / "tars", url


@pytest.fixture
def run_copy(tar_run: tuple, tmp_path: Path) -> tuple[Path, list[str], str]:
    run, _, url = tar_run
    shutil.copytree(run, tmp_path / "run")
    ids = read_table(tmp_path / "run", "images", ["id"]).column("id").to_pylist()
    return tmp_path / "run", ids, url


@pytest.fixture
def decoy_server(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server with tar shards of other images under the same names; yields its
    URL and the paths it was asked for (must stay empty)."""
    corpus_script.write(corpus_script.make(2, 4, (50, 50), damaged=False),
                        tmp_path / "decoy" / "tars", damaged=False)
    asked: list[str] = []

    class Counting(Handler):
        def do_GET(self) -> None:
            asked.append(self.path)
            super().do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        Counting, directory=str(tmp_path / "decoy")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


def _service(run: Path, **kw) -> Service:
    return Service(ServeConfig(run=str(run), device="cpu", **kw))


def test_an_unsealed_run_fetches_only_where_the_user_says(run_copy: tuple,
                                                          decoy_server: tuple) -> None:
    run, ids, url = run_copy
    decoy, asked = decoy_server
    good = _service(run).thumbnail(ids[0])  # sealed here: the recorded place is used
    shutil.rmtree(run / "serve")
    files = Run(run).embed

    def elsewhere(m: dict) -> None:
        m["dataset"]["image_source"]["root"] = f"{decoy}/tars"
    edit(files.manifest_path, elsewhere)  # re-digested, not sealed: a run from elsewhere
    with pytest.raises(Refused, match="not sealed on this machine.*--root"):
        _service(run).thumbnail(ids[0])
    assert asked == []  # the decoy was never asked for anything
    # The user names where the shards are: read there, and only there.
    named = _service(run, root=f"{url}/tars")
    assert named.thumbnail(ids[0]) == good and asked == []

    def climbing(m: dict) -> None:
        m["dataset"]["image_source"]["shards"][0] = "../elsewhere/00000.tar"
    edit(files.manifest_path, climbing)
    with pytest.raises(FormatError, match="not a plain path under its folder"):
        _service(run, root=f"{url}/tars")


def test_the_kind_of_location_must_fit_the_run(run_copy: tuple, tmp_path: Path) -> None:
    run = run_copy[0]
    edit(Run(run).embed.manifest_path, lambda m: m["dataset"]["image_source"].update(
        kind="url"))
    with pytest.raises(InputError, match="must be a remote root"):
        _service(run, root=str(tmp_path))


def test_shard_cache_copies_are_checked_before_use(run_copy: tuple, tmp_path: Path) -> None:
    run, ids, _ = run_copy
    good = {i: _service(run).thumbnail(i) for i in ids[:2]}  # both in shard 0
    (copy,) = (run / "serve/cache").glob("*.tar")
    outside = tmp_path / "outside"
    outside.mkdir()
    decoy_tar = outside / "decoy.tar"
    corpus_script.write(corpus_script.make(1, 4, (50, 50), damaged=False), outside / "d",
                        damaged=False)
    shutil.copy(next((outside / "d").glob("*.tar")), decoy_tar)
    before = fingerprint(outside)
    for tamper in ("altered", "link"):
        shutil.rmtree(run / "serve/thumbs")
        for p in (run / "serve/cache").iterdir():
            p.unlink()
        if tamper == "altered":  # same name, other content: the decoy's members
            shutil.copy(decoy_tar, copy)
        else:
            copy.symlink_to(decoy_tar)
        service = _service(run)
        assert service.thumbnail(ids[1]) == good[ids[1]], tamper  # fetched again
        sound = list((run / "serve/cache").iterdir())
        assert len(sound) == 1 and not sound[0].is_symlink(), tamper
        assert service.thumbnail(ids[0]) == good[ids[0]], tamper
    assert fingerprint(outside) == before


def test_an_unusable_shard_cache_reads_the_shard_as_a_stream(run_copy: tuple,
                                                              tmp_path: Path) -> None:
    run, ids, _ = run_copy
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "serve").mkdir()
    (run / "serve/cache").symlink_to(outside)  # a tampered run: the cache leads outside
    image = Image.open(io.BytesIO(_service(run).thumbnail(ids[-1])))
    assert image.format == "JPEG"
    assert list(outside.iterdir()) == []  # nothing written through the link
    (run / "serve/cache").unlink()
    (run / "serve/cache").write_bytes(b"a file where the folder belongs")
    assert _service(run).thumbnail(ids[0])


def test_file_source_checks_again_at_open(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (8, 8), "red").save(root / "sub/a.png")
    Image.new("RGB", (8, 8), "blue").save(outside / "secret.png")
    (root / "inside.png").symlink_to(root / "sub/a.png")  # a dataset link inside the root
    (root / "out.png").symlink_to(outside / "secret.png")
    os.mkfifo(root / "pipe.png")
    src = FileSource(root)
    assert src.read("inside.png") == (root / "sub/a.png").read_bytes()
    with pytest.raises(OutsideRoot):
        src.read("out.png")
    with pytest.raises(ImageError, match="missing file"):  # never waited on
        src.read("pipe.png")
    # A link swapped in after the check (the resolved path is opened without following).
    src.resolve = lambda key: root / key  # type: ignore[method-assign]
    with pytest.raises(OutsideRoot):
        src.read("out.png")


def test_verify_compares_the_recorded_image_source(run_copy: tuple) -> None:
    run, _, _ = run_copy
    assert Run(run).verify() == []
    edit(Run(run).embed.manifest_path, lambda m: m["dataset"]["image_source"].update(
        root="http://127.0.0.1:9/elsewhere"), sealed=True)
    problems = Run(run).verify()
    assert any("image_source" in p and "one of them was edited" in p for p in problems), \
        problems

