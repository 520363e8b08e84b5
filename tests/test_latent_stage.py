"""The latent stage on a real demo run (tiny CLIP + MiniLM): a derived column that index,
search, heads and dedup take like any other, kept honest across appends and tampering."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from embeddings.errors import FormatError, InputError, RunMismatch
from embeddings.latent import load_latent
from embeddings.store import Run
from embeddings.store.imported import VectorShard, write_vectors_run
from pipeline.cli import main
from pipeline.config import DedupConfig, HeadsConfig, IndexConfig, LatentConfig
from pipeline.dedup import run_dedup
from pipeline.embed import run_embed
from pipeline.heads import run_heads
from pipeline.index import run_index
from pipeline.latent import run_latent
from pipeline.search import search
from tests.conftest import make_config, small_demo

COLUMN = "meta_latent"
NO_CAPTION = 3  # demo rows whose caption is blanked: images without a caption


def latent_config(run: Path, **kw: object) -> LatentConfig:
    base = dict(run=str(run), dim=16, hidden=64, max_rounds=2, progress=False)
    return LatentConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory: pytest.TempPathFactory, encoder_specs: tuple) -> Path:
    """A small demo embedded with the tiny CLIP and MiniLM, a few captions blanked, and its
    latent column written (read-only: copy it)."""
    data = small_demo(tmp_path_factory.mktemp("latent-data"), per_class=5)
    with open(data, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows[:NO_CAPTION]:
        r["caption"] = ""
    with open(data, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path_factory.mktemp("latent-run")
    run_embed(make_config(data, out, encoder_specs))
    run_latent(latent_config(out))
    return out


def copy_run(src: Path, dst: Path) -> Run:
    shutil.copytree(src, dst)
    return Run(dst)


def no_caption_ids(run: Run) -> list[str]:
    table = run.embed.read_table("images", ["id", "captions"]).to_pylist()
    return [r["id"] for r in table if not r["captions"]]


def test_latent_column_is_a_column_of_the_run(latent_run: Path) -> None:
    run = Run(latent_run)
    m = run.embed.manifest()
    col = m.column(COLUMN)
    assert (col.kind, col.modality, col.dim, col.provenance.type) == ("images", "latent", 16,
                                                                     "latent")
    assert set(col.provenance.preprocess["inputs"]) == {"clip_image", "minilm_text"}
    model = load_latent(run.latent.path("meta"))
    assert col.provenance.weights_sha256 == run.latent.load("meta")[0]["weights"]["digest"]
    assert m.own_columns.keys() == {"clip_image", "clip_text", "minilm_text"}
    z = run.embed.read_vectors(COLUMN)
    assert z.shape == (m.rows("images"), 16) and np.isfinite(z).all()
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=2e-3)
    # a row without a caption gets a latent: the model's encoding of its image alone
    missing = no_caption_ids(run)
    assert len(missing) == NO_CAPTION
    ids = run.embed.read_table("images", ["id"]).column(0).to_pylist()
    rows = [ids.index(i) for i in missing]
    img = run.embed.read_vectors("clip_image")[rows]
    alone = model.encode([img, np.zeros((len(rows), 384), np.float32)],
                         [np.ones(len(rows), bool), np.zeros(len(rows), bool)])
    alone /= np.linalg.norm(alone, axis=1, keepdims=True)
    np.testing.assert_allclose(z[rows], alone, atol=3e-3)
    assert run.verify() == [] and run.report().notes == []


def test_index_search_heads_dedup_take_the_latent(latent_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    run = copy_run(latent_run, tmp_path / "run")
    [res] = run_index(IndexConfig(run=str(run.path), columns=(COLUMN,), progress=False))
    assert res.action == "built" and res.ntotal == run.embed.manifest().rows("images")
    first = run.embed.read_table("images", ["id"]).column(0)[0].as_py()
    hits = search(run.path, row_id=first, column=COLUMN, k=5).hits
    assert len(hits) == 5 and hits[0].id == first and hits[0].score == pytest.approx(1, 1e-2)
    with pytest.raises(InputError, match="no encoder embeds a text query into it; search it "
                       "by a stored row: --id ID"):
        search(run.path, text="a bee", column=COLUMN)
    assert main(["search", "--run", str(run.path), "--column", COLUMN, "--id", first,
                 "--k", "3"]) == 0
    assert first in capsys.readouterr().out
    heads = run_heads(HeadsConfig(run=str(run.path), inputs=(COLUMN,), heads=("logistic",),
                                  multilabel="", multitask=()))
    assert heads.rows and COLUMN in heads.rows[0].inputs
    dedup = run_dedup(DedupConfig(run=str(run.path), by=("vector",), column=COLUMN,
                                  threshold=0.999, progress=False))
    assert dedup.summary["signals"]["vector"].startswith(f"{COLUMN} cosine")


def test_append_makes_it_stale_and_a_rerun_encodes_only_the_new_shard(
        latent_run: Path, tmp_path: Path) -> None:
    run = copy_run(latent_run, tmp_path / "run")
    again = run_latent(latent_config(run.path))
    assert (again.action, again.encoded_shards) == ("reused", 0)
    before = {p.file for p in run.derived.columns()[COLUMN].parts}
    m = run.embed.manifest()
    rng = np.random.default_rng(0)
    dims = {c: m.columns[c].dim for c in ("clip_image", "clip_text", "minilm_text")}
    vec = {c: rng.standard_normal((4, d)).astype(np.float32) for c, d in dims.items()}
    for v in vec.values():
        v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = [f"new{i}" for i in range(4)]
    write_vectors_run(run.path, {}, [VectorShard(
        ids, {"clip_image": vec["clip_image"]}, captions=[[f"caption {i}"] for i in ids],
        caption_vectors={c: vec[c] for c in ("clip_text", "minilm_text")})], append=True)
    stale = run.embed.manifest().derived[COLUMN]
    assert "covers 3 of the 4 images shards" in stale and "rerun `python -m pipeline latent`" \
        in stale
    with pytest.raises(FormatError, match="covers 3 of the 4 images shards"):
        run.embed.read_vectors(COLUMN)
    with pytest.raises(FormatError, match="rerun `python -m pipeline latent`"):
        run_index(IndexConfig(run=str(run.path), columns=(COLUMN,), progress=False))
    assert run.verify() == [] and any("covers 3 of the 4" in n for n in run.report().notes)
    r = run_latent(latent_config(run.path))
    assert (r.action, r.encoded_shards, r.shards) == ("reused", 1, 4)
    parts = run.derived.columns()[COLUMN].parts
    assert before <= {p.file for p in parts}  # the old parts were kept as they were
    assert run.embed.read_vectors(COLUMN).shape == (m.rows("images") + 4, 16)
    assert run.verify() == [] and run.report().notes == []


def test_tampered_part_refused_and_rebuild_rewrites(latent_run: Path, tmp_path: Path) -> None:
    run = copy_run(latent_run, tmp_path / "run")
    part = run.derived.columns()[COLUMN].parts[1]
    path = run.derived.shard_path(part)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="derived column part .* is corrupt"):
        run.embed.read_vectors(COLUMN)
    assert any("derived column part" in p for p in run.verify())
    digest = run.embed.manifest().column(COLUMN).provenance.weights_sha256
    r = run_latent(latent_config(run.path, rebuild=True, seed=1))
    assert (r.action, r.encoded_shards) == ("trained", r.shards)
    assert run.embed.manifest().column(COLUMN).provenance.weights_sha256 != digest
    assert not path.exists() and run.verify() == [] and run.report().leftovers == []
    [res] = run_index(IndexConfig(run=str(run.path), columns=(COLUMN,), progress=False))
    assert res.action == "built"
    manifest = run.derived.manifest_path  # an edited manifest is refused, naming itself
    manifest.write_text(manifest.read_text().replace('"stage": "latent"', '"stage": "x"'))
    with pytest.raises(FormatError, match="derived columns manifest .* remove the run's "
                       "derived/ folder"):
        run.embed.read_vectors(COLUMN)


def test_saved_model_refused_on_columns_of_other_models(latent_run: Path,
                                                        tmp_path: Path) -> None:
    src = Run(latent_run)
    m = src.embed.manifest()
    rng = np.random.default_rng(0)
    ids = [f"i{i}" for i in range(40)]
    vec = {c: rng.standard_normal((40, m.columns[c].dim)).astype(np.float32)
           for c in ("clip_image", "minilm_text")}
    other = write_vectors_run(tmp_path / "other", {c: v.shape[1] for c, v in vec.items()},
                              [VectorShard(ids, {"clip_image": vec["clip_image"]},
                                           caption_vectors={"minilm_text": vec["minilm_text"]})])
    shutil.copytree(src.latent.dir, other.latent.dir)
    with pytest.raises(RunMismatch, match="column 'clip_image' of run .* comes from a "
                       "different model .*latent --rebuild"):
        run_latent(latent_config(other.path))
    assert run_latent(latent_config(other.path, rebuild=True)).action == "trained"


def test_latent_config_and_cli(latent_run: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    run = copy_run(latent_run, tmp_path / "run")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'run = "{run.path}"\n[latent]\ninputs = ["clip_image"]\nname = "img"\n'
                   "dim = 8\nhidden = 32\nmax_rounds = 1\nprogress = false\n")
    assert main(["latent", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "column img_latent" in out and "PCA of the same width" in out
    assert run.embed.manifest().column("img_latent").dim == 8
    assert main(["latent", "--config", str(cfg), "--inputs", "clip_image,meta_latent"]) == 2
    assert "input 'meta_latent' is a derived column" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"\[latent\] latent dim must be >= 1"):
        run_latent(latent_config(run.path, dim=0))
