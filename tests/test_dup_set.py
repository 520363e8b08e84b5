"""The duplicate test set builder and the evaluation's scoring, on real photos.

Photos only by default (scikit-image ships them); the drawing part runs where Debian's
openclipart-svg and an SVG renderer are installed."""

from __future__ import annotations

import csv
import importlib
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embeddings.dedup import exact_groups, hash_groups
from embeddings.fingerprint import content_digest, phash
from embeddings.images import decode_image

REPO = Path(__file__).resolve().parents[1]


def module(folder: str, name: str):
    sys.path.insert(0, str(REPO / folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / folder))


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    out = tmp_path_factory.mktemp("dups")
    build = module("scripts", "build_dup_set")
    assert build.main(["--out", str(out), "--drawings", "0", "--photos", "astronaut",
                       "coffee", "camera", "coins", "stereo_motorcycle"]) == 0
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        return out, list(csv.DictReader(f))


def test_set_has_every_copy_and_its_ground_truth(photo_set) -> None:
    out, rows = photo_set
    build = module("scripts", "build_dup_set")
    assert list(rows[0]) == list(build.COLUMNS)
    by_id = {r["id"]: r for r in rows}
    groups = {r["group"] for r in rows if r["transform"] != "similar"}
    assert len(groups) == 5
    for g in groups:
        members = [r for r in rows if r["group"] == g]
        assert sorted(r["transform"] for r in members) == sorted(
            ["original", *build.TRANSFORMS])
        orig = (out / by_id[f"{g}/original"]["image"]).read_bytes()
        assert (out / by_id[f"{g}/exact"]["image"]).read_bytes() == orig
        w, h = int(by_id[f"{g}/original"]["width"]), int(by_id[f"{g}/original"]["height"])
        half = by_id[f"{g}/resize50"]
        assert (int(half["width"]), int(half["height"])) == (round(w / 2), round(h / 2))
        crop = by_id[f"{g}/crop10"]
        assert int(crop["width"]) == w - 2 * round(w * 0.1)
        for q in (90, 30):
            data = (out / by_id[f"{g}/jpeg{q}"]["image"]).read_bytes()
            assert data[:2] == b"\xff\xd8" and data != orig
        flip = np.asarray(Image.open(out / by_id[f"{g}/flip"]["image"]).convert("L"), float)
        base = np.asarray(Image.open(io.BytesIO(orig)).convert("L"), float)
        assert np.abs(flip[:, ::-1] - base).mean() < 3  # a mirror (of a JPEG: not exact)
    look = [r for r in rows if r["transform"] == "similar"]
    assert [r["related"] for r in look] == ["photo/stereo_motorcycle/original"]
    assert look[0]["group"] != by_id[look[0]["related"]]["group"]
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert "| jpeg30 | 5 | 0 |" in (out / "README.md").read_text()


def test_scores_of_fingerprint_groups_on_the_photos(photo_set) -> None:
    """pHash groups recover re-encodes and resizes of real photos, miss the flips, keep
    the stereo look-alike apart, and the evaluation scores say exactly that."""
    out, rows = photo_set
    bench = module("benchmarks", "bench_dedup")
    blobs = [(out / r["image"]).read_bytes() for r in rows]
    hashes = np.array([phash(decode_image(b)) for b in blobs], dtype=np.uint64)
    digests = [content_digest(b) for b in blobs]
    d = {k: np.array([r[k] for r in rows], dtype=object)
         for k in ("id", "group", "transform", "related")}
    d["ids"], d["gt"] = d.pop("id"), d["group"].astype(str)
    # the stereo views are 8 bits apart: a look-alike pHash joins at 8 bits, not at 6
    assert bench.scores(hash_groups(hashes, 8).labels(), d)["similar"][0] == 1.0
    got = bench.scores(hash_groups(hashes, 6, uf=exact_groups(digests)).labels(), d)
    for t in ("exact", "jpeg90", "jpeg70", "jpeg50", "jpeg30", "resize50", "resize25"):
        assert got[t][1] == 1.0, t
    assert got["flip"][1] == 0.0
    assert got["similar"][0] == 0.0  # not merged with the image it resembles
    assert got["all pairs"][0] == 1.0  # nothing wrong was merged on these five photos
    # the oracle: count the pairs by hand
    pred, correct, true = bench.pair_counts(np.array([0, 0, 0, 1, 1]),
                                            np.array(["a", "a", "b", "b", "b"]))
    assert pred.tolist() == [2, 2, 2, 1, 1]
    assert correct.tolist() == [1, 1, 0, 1, 1] and true.tolist() == [1, 1, 2, 2, 2]


@pytest.mark.skipif(not Path("/usr/share/openclipart/svg").is_dir()
                    or not (shutil.which("rsvg-convert")
                            or importlib.util.find_spec("cairosvg")),
                    reason="needs openclipart-svg and an SVG renderer (demo-build extra)")
def test_drawings_and_their_look_alikes(tmp_path) -> None:
    build = module("scripts", "build_dup_set")
    assert build.main(["--out", str(tmp_path), "--drawings", "3", "--similar", "2",
                       "--photos", "coins", "--categories", "food", "--size", "96"]) == 0
    with open(tmp_path / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    drawings = [r for r in rows if r["source"] == "drawing"]
    assert sum(r["transform"] == "original" for r in drawings) == 3
    look = [r for r in drawings if r["transform"] == "similar"]
    assert len(look) == 2 and all(r["related"].endswith("/original") for r in look)
    assert len(drawings) == 3 * 12 + 2
    assert all(Image.open(tmp_path / r["image"]).size[0] <= 96 for r in drawings)
