"""Image sources on their own: the files rule, remote roots over real loopback servers
(HTTP and moto's S3), tar shards and every way they can be damaged."""

from __future__ import annotations

import io
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from embeddings.errors import InputError
from embeddings.images import ImageError
from embeddings.ingest import Fields, open_dataset
from embeddings.sources import (
    FileSource,
    Network,
    OutsideRoot,
    TarSource,
    UrlSource,
    expand,
    open_source,
    redact,
    source_from_dict,
)
from embeddings.sources.remote import call
from tests._remote_fixtures import Handler, http_server, s3_server, upload

FAST = Network(retries=2, backoff=0.01, timeout=5)


def _jpeg(seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]], cut: int | None = None) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data[:cut] if cut else data)
    return path


def test_brace_patterns() -> None:
    assert expand("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert expand("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand("plain.tar") == ["plain.tar"] and expand("{x}.tar") == ["{x}.tar"]
    assert expand("{3..1}") == ["3", "2", "1"]


def test_file_source_rule_is_one_rule_for_columns_and_reads(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (root / "a/x.jpg").write_bytes(b"x")
    (outside / "secret.jpg").write_bytes(b"secret")
    (root / "a/link.jpg").symlink_to(outside / "secret.jpg")
    (root / "out").symlink_to(outside)
    src = FileSource(root)
    keys = pa.array(["a/x.jpg", "./a/../a/x.jpg", "../outside/secret.jpg", "a/link.jpg",
                     "out/secret.jpg", str(root / "a/x.jpg"), "/etc/passwd", None])
    got = src.check(keys)
    assert got.reasons.is_null().to_pylist() == [True, True, False, False, False, True,
                                                 False, True]
    assert got.keys.to_pylist()[:2] == ["a/x.jpg", "a/x.jpg"]
    assert got.keys.to_pylist()[5] == "a/x.jpg"
    for key, ok in zip(keys.to_pylist()[:7], got.reasons.is_null().to_pylist()):
        if ok:
            assert src.read(key) == b"x"
        else:  # every key the column check refuses is refused on read too
            with pytest.raises(OutsideRoot, match="escapes the dataset root"):
                src.read(key)
    with pytest.raises(ImageError, match="missing file"):
        src.read("a/none.jpg")
    url = src.check(pa.array(["https://example.com/a/x.jpg"])).reasons.to_pylist()[0]
    assert url.startswith("image is a URL but the dataset root is a local folder")
    clone = pickle.loads(pickle.dumps(src))
    assert clone.read("a/x.jpg") == b"x" and clone.describe() == src.describe()


def test_url_source_over_http(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img/a.jpg").write_bytes(_jpeg())
    (tmp_path / "img/empty.jpg").write_bytes(b"")
    (tmp_path / "secret.txt").write_text("secret")
    with http_server(tmp_path) as url:
        src = UrlSource(f"{url}/img", FAST)
        assert src.read("a.jpg") == src.read(f"{url}/img/a.jpg") == _jpeg()
        with pytest.raises(ImageError, match=r"^not found: http://127.0.0.1:\d+/img/nope.jpg$"):
            src.read("nope.jpg")
        with pytest.raises(ImageError, match="empty file"):
            src.read("empty.jpg")
        for key in ("../secret.txt", "%2e%2e/secret.txt", f"{url}/secret.txt", "/secret.txt",
                    "http://127.0.0.2/img/a.jpg"):
            with pytest.raises(OutsideRoot, match="escapes the dataset root"):
                src.read(key)
        checked = src.check(pa.array(["a.jpg", "./b//c.jpg", f"{url}/img/d.jpg", "../x"]))
        assert checked.keys.to_pylist()[:3] == ["a.jpg", "b/c.jpg", "d.jpg"]
        assert checked.reasons.is_null().to_pylist() == [True, True, True, False]
        # a redirect out of the root is not followed
        away = UrlSource(url, FAST)
        with pytest.raises(OutsideRoot, match="redirected outside the configured root"):
            away.read("away/img/a.jpg")
        # transient errors are retried with backoff, then the item is unreachable
        Handler.failures, Handler.seen = 2, {}
        assert away.read("flaky/img/a.jpg") == _jpeg()
        Handler.failures = 9
        with pytest.raises(ImageError, match=r"^unreachable: .*flaky/img/a.jpg \(3 tries; .*503"):
            away.read("flaky/img/a.jpg")
        assert pickle.loads(pickle.dumps(src)).read("a.jpg") == _jpeg()
    with pytest.raises(ImageError, match=r"^unreachable: http://127.0.0.1:1/a.jpg \(3 tries"):
        UrlSource("http://127.0.0.1:1", FAST).read("a.jpg")


def test_retries_back_off_and_give_up() -> None:
    waits: list[float] = []
    tries = []

    def flaky() -> bytes:
        tries.append(1)
        raise ConnectionResetError("peer went away")

    with pytest.raises(ImageError, match="unreachable: s3://b/k .3 tries; ConnectionReset"):
        call(flaky, "s3://b/k", Network(retries=2, backoff=0.5), sleep=waits.append)
    assert len(tries) == 3 and waits == [0.5, 1.0]
    tries.clear()

    def missing() -> bytes:
        tries.append(1)
        raise FileNotFoundError("k")

    with pytest.raises(ImageError, match="not found"):
        call(missing, "s3://b/k", Network(retries=5), sleep=waits.append)
    assert len(tries) == 1  # a 404 is final


def test_credentials_never_recorded() -> None:
    with pytest.raises(InputError, match="user name or password"):
        UrlSource("https://user:hunter2@example.com/images")
    with pytest.raises(InputError, match="user name or password"):
        TarSource("https://user:hunter2@example.com/{0..1}.tar")
    text = "https://h/x.jpg?X-Amz-Signature=abc123&X-Amz-Credential=AKIA&size=2"
    assert "abc123" not in redact(text) and "AKIA" not in redact(text) and "size=2" in redact(text)
    with pytest.raises(InputError, match="pipe: URLs are not accepted"):
        TarSource("pipe:curl -s https://example.com/0.tar")


def test_s3_objects_and_tar_shards(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img/a.jpg").write_bytes(_jpeg(1))
    _tar(tmp_path / "00000.tar", [("k1.jpg", _jpeg(2)), ("k1.txt", b"hello")])
    with s3_server():
        upload(tmp_path, "s3://bkt/data")
        src = open_source("s3://bkt/data/img")
        assert isinstance(src, UrlSource) and src.describe() == {"kind": "url",
                                                                 "root": "s3://bkt/data/img"}
        assert src.read("a.jpg") == src.read("s3://bkt/data/img/a.jpg") == _jpeg(1)
        with pytest.raises(ImageError, match="^not found: s3://bkt/data/img/b.jpg"):
            src.read("b.jpg")
        for key in ("s3://other/data/img/a.jpg", "s3://bkt/data/imgx/a.jpg", "../00000.tar"):
            with pytest.raises(OutsideRoot):
                src.read(key)
        tar = TarSource("s3://bkt/data/00000.tar")
        assert tar.read_shard(0).members == [("k1.jpg", _jpeg(2)), ("k1.txt", b"hello")]
        assert tar.sidecar(0) is None
        again = source_from_dict(tar.describe())
        cached = again.with_cache(tmp_path / "cache", 10**9)
        assert cached.read("00000.tar/k1.jpg") == _jpeg(2)
        assert len(list((tmp_path / "cache").glob("*.tar"))) == 1


def test_bad_shards_and_samples_are_counted_with_reasons(tmp_path: Path) -> None:
    good = _jpeg(3)
    _tar(tmp_path / "00000.tar", [
        ("a.jpg", good), ("a.txt", b"cap a"),
        ("b.txt", b"no image"), ("b.json", b"{}"),
        ("c.jpg", good), ("c.png", good),
        ("d.jpg", good), ("d.xyz", b"?"),
        ("noext", b"?"),
        ("a.jpg", good),  # key a again, later: a duplicate
        ("e.jpg", good), ("e.json", b"{not json"),
        ("f.jpg", good), ("f.txt", b"\xff\xfe"),
        ("g.jpg", good), ("g.json", b'{"caption": ["one", "two"], "tags": ["x", "y"], '
                                    b'"split": "val"}'),
    ])
    whole = _tar(tmp_path / "00001.tar", [("h.jpg", good), ("i.jpg", good), ("j.jpg", good)])
    with tarfile.open(whole) as tf:
        cut = tf.getmember("i.jpg").offset_data + 10
    whole.write_bytes(whole.read_bytes()[:cut])  # cut inside i.jpg's data
    (tmp_path / "00002.tar").write_bytes(b"this is not a tar file at all" * 40)
    ds = open_dataset(str(tmp_path / "{00000..00003}.tar"),
                      fields=Fields(caption="caption", labels="tags", split="split"))
    blocks = [b.ready() for b in ds.blocks(1000)]
    assert [b.index for b in blocks] == [0, 1, 2, 3]
    why = {(r.kind, r.id): r.reason.split(":")[0] for b in blocks for r in b.rejects}
    assert why == {
        ("images", "b"): "no image in sample (members",
        ("images", "c"): "two images for one key",
        ("members", "00000.tar/d.xyz"): "unused member",
        ("members", "00000.tar/noext"): "unused member",
        ("images", "a"): "duplicate id",
        ("images", "e"): "invalid JSON",
        ("images", "f"): "caption is not UTF-8",
        ("shards", "00001.tar"): "corrupt or truncated tar",
        ("shards", "00002.tar"): "corrupt or truncated tar",
        ("shards", "00003.tar"): "not found",
    }
    first = blocks[0]
    assert first.image_column("id") == ["a", "d", "g"]  # the first of two a's is kept
    g = first.image_table.to_pylist()[2]
    assert g["captions"] == ["one", "two"] and g["labels"] == ["x", "y"] and g["split"] == "val"
    assert blocks[1].image_column("id") == ["h"]
    assert set(first.payload) == {"00000.tar/a.jpg", "00000.tar/d.jpg", "00000.tar/g.jpg"}
    assert ds.image_source.read("00000.tar/g.jpg") == good
    with pytest.raises(OutsideRoot):
        ds.image_source.read("00009.tar/g.jpg")
    with pytest.raises(ImageError, match="missing file"):
        ds.image_source.read("00000.tar/zz.jpg")


def test_a_json_member_nested_too_deeply_is_rejected(tmp_path: Path) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000  # RecursionError in json, not a traceback
    _tar(tmp_path / "00000.tar", [("a.jpg", _jpeg()), ("a.json", deep),
                                  ("b.jpg", _jpeg()), ("b.json", b'{"label": "x"}')])
    (block,) = [b.ready() for b in open_dataset(str(tmp_path / "00000.tar"),
                                                fields=Fields(label="label")).blocks(10)]
    assert [(r.id, r.reason) for r in block.rejects] == [
        ("a", "invalid JSON: a.json: nested too deeply")]
    assert block.image_column("id") == ["b"]


def test_mistakes_are_one_line_before_any_work(tmp_path: Path, monkeypatch, capsys) -> None:
    from pipeline.cli import main

    (tmp_path / "m.csv").write_text("image\na.jpg\n")
    _tar(tmp_path / "00000.tar", [("a.jpg", _jpeg())])
    run = ["--run", str(tmp_path / "run")]
    cases = {
        ("--data", str(tmp_path / "00000.tar"), "--root", str(tmp_path)):
            "root does not apply to tar shards",
        ("--data", str(tmp_path / "m.csv"), "--caption-field", "caption"):
            "apply to webdataset tar shards only",
        ("--data", "s3://bucket/manifest.csv"): "a manifest is read from a local file",
        ("--data", str(tmp_path / "{00001..00002}.tar")): "no tar shard found",
        ("--data", str(tmp_path / "m.csv"), "--root", "https://u:p@example.com/x"):
            "carries a user name or password",
        ("--data", str(tmp_path / "m.csv"), "--retries", "-1"): "retries must be >= 0",
    }
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed
    cases[("--data", "s3://bucket/{00000..00001}.tar")] = "needs s3fs, which is not installed"
    for args, message in cases.items():
        assert main(["embed", *args, *run]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
