import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embeddings.ingest import load_dataset


def _touch(root: Path, *names: str) -> None:
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"x")


def test_csv_groups_captions_and_splits_labels(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text(
        "image,caption,labels,split\n"
        "a.png,a cat,cat|pet,train\n"
        "a.png,a small cat,cat|pet,train\n"
        "b.png,一只狗,dog,test\n", encoding="utf-8")
    ds = load_dataset(tmp_path / "m.csv")
    assert [i.id for i in ds.images] == ["a.png", "b.png"]
    assert ds.images[0].captions == ("a cat", "a small cat")
    assert ds.images[0].labels == ("cat", "pet") and ds.images[0].label is None
    assert ds.images[1].label == "dog"
    assert [(c.id, c.image_id, c.caption) for c in ds.captions] == [
        ("a.png#0", "a.png", "a cat"), ("a.png#1", "a.png", "a small cat"),
        ("b.png#0", "b.png", "一只狗")]


def test_ids_stay_strings(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("id,image,caption,label\n007,a.png,x,1\n")
    ds = load_dataset(tmp_path / "m.csv")
    assert ds.images[0].id == "007" and ds.images[0].label == "1"


def test_jsonl_and_parquet_match(tmp_path: Path) -> None:
    rows = [{"id": "x1", "image": "x.png", "captions": ["one", "two"], "labels": ["a", "b"],
             "split": "val"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    a, b = load_dataset(tmp_path / "m.jsonl"), load_dataset(tmp_path / "m.parquet")
    assert a.images == b.images and a.captions == b.captions
    assert a.images[0].captions == ("one", "two") and a.images[0].split == "val"


def test_bad_rows_are_rejected_not_raised(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text(
        '{"id": "ok", "image": "a.png", "caption": "fine"}\n'
        '{"id": "up", "image": "../../etc/passwd", "caption": "escape"}\n'
        '{"id": "abs", "image": "/etc/passwd", "caption": "escape"}\n'
        '{"id": "ok", "image": "b.png", "caption": "same id, other image"}\n'
        '{"id": "blank", "image": "c.png", "caption": "  "}\n'
        '{"id": "noimg", "caption": "no image"}\n'
        'not json\n')
    ds = load_dataset(tmp_path / "m.jsonl")
    reasons = {(r.id, r.reason.split(":")[0].split(" (")[0]) for r in ds.rejects}
    assert reasons == {("up", "image path escapes the dataset root"),
                       ("abs", "image path escapes the dataset root"),
                       ("ok", "duplicate id"), ("blank#0", "empty caption"),
                       ("noimg", "no image path in row"), ("line:7", "invalid JSON")}
    assert [i.id for i in ds.images] == ["ok", "blank"]
    assert [c.id for c in ds.captions] == ["ok#0"]


def test_imagefolder_with_and_without_splits(tmp_path: Path) -> None:
    _touch(tmp_path / "flat", "cat/1.jpg", "dog/2.png", "dog/notes.txt")
    _touch(tmp_path / "split", "train/cat/1.jpg", "test/dog/2.jpg")
    flat = load_dataset(tmp_path / "flat")
    assert [(i.id, i.label, i.split) for i in flat.images] == [
        ("cat/1.jpg", "cat", None), ("dog/2.png", "dog", None)]
    split = load_dataset(tmp_path / "split")
    assert {(i.label, i.split) for i in split.images} == {("cat", "train"), ("dog", "test")}
    assert split.captions == []


def test_coco_and_karpathy_multi_caption(tmp_path: Path) -> None:
    coco = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
            "annotations": [{"id": 10, "image_id": 1, "caption": "a"},
                            {"id": 11, "image_id": 1, "caption": "b"},
                            {"id": 12, "image_id": 2, "caption": "c"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    ds = load_dataset(tmp_path / "coco.json")
    assert ds.format == "coco"
    assert [(c.id, c.image_id) for c in ds.captions] == [("10", "1"), ("11", "1"), ("12", "2")]
    karpathy = {"images": [{"filepath": "val2014", "filename": "x.jpg", "imgid": 0,
                            "split": "test", "sentences": [{"raw": "s1", "sentid": 0},
                                                           {"raw": "s2", "sentid": 1}]}]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    ds = load_dataset(tmp_path / "k.json")
    assert ds.format == "karpathy"
    assert ds.images[0].image == "val2014/x.jpg" and ds.images[0].split == "test"
    assert [c.caption for c in ds.captions] == ["s1", "s2"]


def test_unknown_inputs_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        load_dataset(tmp_path / "nope.csv")
    (tmp_path / "x.txt").write_text("?")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_dataset(tmp_path / "x.txt")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="neither COCO"):
        load_dataset(tmp_path / "x.json")
