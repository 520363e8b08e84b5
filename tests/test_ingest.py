"""Streaming ingest: blocks against a row-by-row reference, every format, hostile rows."""

from __future__ import annotations

import csv
import json
import os
import random
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embeddings.errors import InputError, MissingError
from embeddings.ingest import MAX_CAPTION_CHARS, Block, load_dataset, open_dataset

COLUMNS = ("id", "image", "caption", "label", "split")
REASONS = {"invalid JSON", "not a JSON object", "malformed CSV row", "no image path in row",
           "image path contains a NUL byte", "image path escapes the dataset root",
           "duplicate id", "empty caption", "caption too long", "duplicate caption id"}


# ------------------------------------------------------------------ the reference

def reference(rows: list[dict[str, str]], size: int) -> list[tuple[list, list, list]]:
    """The documented rules, row by row in plain Python: per block (images, captions,
    rejects) as tuples; the oracle for the vectorised ingest (lexical paths only)."""
    blocks: dict[int, tuple[list, list, list]] = {}
    seen: dict[str, list] = {}  # id -> [fields, caption count]
    n_images, prev, run = 0, None, None
    for n, row in enumerate(rows):
        block = blocks.setdefault(max(n_images - 1, 0) // size, ([], [], []))
        image, rid = row["image"] or None, row["id"].strip() or None
        if image is None:
            block[2].append(("images", rid or f"row:{n}", "no image path in row"))
            continue
        norm = os.path.normpath(image)
        if norm.startswith("..") or norm.startswith("/"):
            block[2].append(("images", rid or norm, "image path escapes the dataset root"))
            continue
        rid = rid or norm
        fields = (norm, row["split"].strip() or None, row["label"].strip() or None)
        if rid != prev:  # a new run
            prev = rid
            if rid in seen:
                run = [seen[rid], None]
            else:
                entry = seen[rid] = [fields, 0]
                record = [rid, *fields, []]
                block = blocks.setdefault(n_images // size, ([], [], []))
                n_images += 1
                block[0].append(record)
                run = [entry, record]
        entry, record = run
        if fields != entry[0]:
            block[2].append(("images", rid, "duplicate id"))
            continue
        cid = f"{rid}#{entry[1]}"
        entry[1] += 1
        text = row["caption"].strip()
        if not text:
            block[2].append(("captions", cid, "empty caption"))
        elif len(text) > MAX_CAPTION_CHARS:
            block[2].append(("captions", cid, "caption too long"))
        else:
            block[1].append((cid, rid, text, *entry[0][1:]))
            if record is not None:
                record[4].append(text)
    return [(sorted_images(b[0]), b[1], b[2]) for _, b in sorted(blocks.items())]


def sorted_images(images: list) -> list:
    return [(rid, image, split, label, tuple(caps)) for rid, image, split, label, caps in images]


def as_tuples(block: Block) -> tuple[list, list, list]:
    return ([(i.id, i.image, i.split, i.label, i.captions) for i in block.images],
            [(c.id, c.image_id, c.caption, c.split, c.label) for c in block.captions],
            [(r.kind, r.id, r.reason.split(":")[0]) for r in block.rejects])


def random_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        k = rng.randrange(40)
        image = rng.choice([f"img/{k}.jpg", f"img/{k}.jpg", f"./img/{k}.jpg", "", "../out.jpg",
                            f"img//{k}.jpg"]) if rng.random() < 0.15 else f"img/{k}.jpg"
        rid = rng.choice(["", f"id{k}", f"{k:03d}"]) if rng.random() < 0.3 else ""
        base = {"id": rid, "image": image, "label": f"c{k % 3}" if rng.random() < 0.95 else "x",
                "split": "train" if k % 4 else "test"}
        for _ in range(rng.choice([1, 1, 2, 3])):  # contiguous captions of one image
            caption = rng.choice(["", "  ", f"caption {len(rows)}", "x" * (MAX_CAPTION_CHARS + 1)]
                                 ) if rng.random() < 0.1 else f"caption {len(rows)} of {k}"
            rows.append({**base, "caption": caption})
    return rows[:n]


def write(rows: list[dict[str, str]], path: Path) -> Path:
    if path.suffix == ".csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ------------------------------------------------------------------ blocks vs reference

@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
@pytest.mark.parametrize("size", [1, 7, 1000])
def test_blocks_match_the_row_by_row_reference(tmp_path: Path, suffix: str, size: int) -> None:
    rows = random_rows(600, seed=size)
    src = open_dataset(write(rows, tmp_path / f"m{suffix}"))
    got = [as_tuples(b) for b in src.blocks(size)]
    want = reference(rows, size)
    assert [b.index for b in src.blocks(size)] == list(range(len(want)))
    assert got == want
    assert all(len(b[0]) == size for b in got[:-1])
    assert src.stats.images == sum(len(b[0]) for b in want)
    assert src.stats.rejects == sum(len(b[2]) for b in want)


def test_chunk_boundaries_do_not_matter(tmp_path: Path, monkeypatch) -> None:
    import embeddings.ingest.readers as readers
    rows = random_rows(500, seed=3)
    path = write(rows, tmp_path / "m.jsonl")
    whole = [as_tuples(b) for b in open_dataset(path).blocks(5)]
    monkeypatch.setattr(readers, "ROWS_PER_CHUNK", 3)  # runs straddle every chunk
    assert [as_tuples(b) for b in open_dataset(path).blocks(5)] == whole


def test_skip_yields_the_other_blocks_unchanged(tmp_path: Path) -> None:
    path = write(random_rows(400, seed=1), tmp_path / "m.csv")
    src = open_dataset(path)
    full = {b.index: as_tuples(b) for b in src.blocks(10)}
    stats = src.stats
    part = {b.index: as_tuples(b) for b in src.blocks(10, skip={0, 2, 5})}
    assert set(part) == set(full) - {0, 2, 5}
    assert all(part[k] == full[k] for k in part)
    assert src.stats == stats  # counts cover skipped blocks too


def test_load_dataset_is_the_blocks_concatenated(tmp_path: Path) -> None:
    path = write(random_rows(300, seed=2), tmp_path / "m.parquet")
    ds = load_dataset(path)
    blocks = list(open_dataset(path).blocks(4))
    assert ds.images == [i for b in blocks for i in b.images]
    assert ds.captions == [c for b in blocks for c in b.captions]
    assert ds.rejects == [r for b in blocks for r in b.rejects]


def test_block_tables_are_the_records(tmp_path: Path) -> None:
    block = next(open_dataset(write(random_rows(50, seed=4), tmp_path / "m.csv")).blocks(100))
    assert block.image_table.to_pylist() == [
        {"id": i.id, "image": i.image, "split": i.split, "label": i.label,
         "labels": list(i.labels), "captions": list(i.captions)} for i in block.images]
    assert [r["id"] for r in block.caption_table.to_pylist()] == [c.id for c in block.captions]


def test_repeats_continue_caption_ids_in_their_own_block(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text(
        "id,image,caption,label\n7,a.png,one,x\n7,a.png,two,x\n8,b.png,b,y\n"
        "7,a.png,three,x\n7,c.png,other image,x\n", encoding="utf-8")
    b0, b1 = open_dataset(tmp_path / "m.csv").blocks(1)
    assert b0.images[0].captions == ("one", "two")
    assert [c.id for c in b0.captions] == ["7#0", "7#1"]
    assert [(c.id, c.image_id, c.caption) for c in b1.captions] == [
        ("8#0", "8", "b"), ("7#2", "7", "three")]
    assert [(r.id, r.reason.split(":")[0]) for r in b1.rejects] == [("7", "duplicate id")]


@pytest.mark.parametrize("kind", ["coco", "karpathy", "imagefolder"])
def test_in_memory_formats_go_through_blocks(tmp_path: Path, kind: str) -> None:
    if kind == "coco":
        path = tmp_path / "c.json"
        path.write_text(json.dumps({
            "images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(5)],
            "annotations": [{"id": 10 * i + j, "image_id": i, "caption": f"c{i}{j}" if j else ""}
                            for i in range(5) for j in range(3)] +
                           [{"id": 11, "image_id": 4, "caption": "dup id"}]}))
    elif kind == "karpathy":
        path = tmp_path / "k.json"
        path.write_text(json.dumps({"images": [
            {"filepath": "d", "filename": f"{i}.jpg", "imgid": i, "split": "test",
             "sentences": [{"raw": f"s{i}{j}", "sentid": 2 * i + j} for j in range(2)]}
            for i in range(5)]}))
    else:
        path = tmp_path / "f"
        for i in range(5):
            (path / f"cls{i % 2}").mkdir(parents=True, exist_ok=True)
            (path / f"cls{i % 2}" / f"{i}.jpg").write_bytes(b"x")
    ds = load_dataset(path)
    blocks = list(open_dataset(path).blocks(2))
    assert [len(b.images) for b in blocks] == [2, 2, 1]
    assert ds.images == [i for b in blocks for i in b.images]
    assert ds.captions == [c for b in blocks for c in b.captions]
    assert ds.rejects == [r for b in blocks for r in b.rejects]
    if kind == "coco":
        assert {(r.id, r.reason) for r in ds.rejects} == {
            *((str(10 * i), "empty caption") for i in range(5)), ("11", "duplicate caption id")}


# ------------------------------------------------------------------ bounded memory

def test_100k_rows_ingest_in_bounded_memory(tmp_path: Path, monkeypatch) -> None:
    import embeddings.ingest.readers as readers
    path = tmp_path / "m.csv"
    with open(path, "w", encoding="utf-8") as f:
        f.write("id,image,caption,label\n")
        f.writelines(f"{i:07d},img/{i % 100}/{i}.jpg,a caption of image {i},c{i % 10}\n"
                     for i in range(100_000))
    monkeypatch.setattr(readers, "CSV_BLOCK_BYTES", 256 << 10)  # ~6k-row chunks
    list(open_dataset(write(random_rows(20, 0), tmp_path / "warm.csv")).blocks(5))  # imports
    arrow_peak = images = captions = 0
    tracemalloc.start()
    try:
        for block in open_dataset(path).blocks(1000):
            images += block.image_table.num_rows
            captions += block.caption_table.num_rows
            if block.index % 10 == 0:  # records too, one block at a time (tracing is slow)
                assert len(block.images) == block.image_table.num_rows
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert images == captions == 100_000
    # Streaming holds a chunk, one block's records and the id index (~4 MB here).  The
    # records of the whole dataset (load_dataset) peak at about 118 MB on this file.
    assert python_peak < 12e6
    assert arrow_peak < 32e6


# ------------------------------------------------------------------ hostile input

def _rejects(path: Path, **kw) -> tuple[list, dict]:
    ds = load_dataset(path, **kw)
    reasons = {r.id: r.reason for r in ds.rejects}
    assert all(r.split(":")[0] in REASONS for r in reasons.values()), reasons
    return [i.id for i in ds.images], reasons


def test_hostile_csv_rows_are_rejects_and_the_rest_ingests(tmp_path: Path) -> None:
    huge = "y" * 140_000  # over 128 KB: used to stop csv.DictReader
    (tmp_path / "m.csv").write_bytes(
        ("\ufeffid,image,caption\n"  # a BOM before the first column name
         "ok,a.png,fine\n"
         "nul,b\x00.png,null byte\n"
         f"big,c.png,{huge}\n"
         'empty,d.png,""\n'
         "short,e.png\n"
         "last,f.png,also fine\n").encode())
    images, reasons = _rejects(tmp_path / "m.csv")
    assert images == ["ok", "big", "empty", "last"]
    assert reasons["nul"] == "image path contains a NUL byte"
    assert reasons["big#0"] == f"caption too long: 140000 characters (limit {MAX_CAPTION_CHARS})"
    assert reasons["empty#0"] == "empty caption"
    assert [r for k, r in reasons.items() if k.startswith("csv:")] == [
        "malformed CSV row: expected 3 fields, got 2"]


def test_hostile_jsonl_lines_are_rejects_and_the_rest_ingests(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text(
        '\ufeff{"id": "ok", "image": "a.png", "caption": "fine"}\n'
        '[1, 2]\n42\n{"id": "x", oops}\n{broken\n'
        '{"id": "nul", "image": "b\\u0000.png", "caption": "c"}\n'
        '{"id": "empty", "image": "c.png", "caption": ""}\n'
        '{"id": "last", "image": "d.png", "captions": ["a", "b"]}\n', encoding="utf-8")
    images, reasons = _rejects(tmp_path / "m.jsonl")
    assert images == ["ok", "empty", "last"]
    assert reasons["line:2"] == "not a JSON object: line 2 is a list"
    assert reasons["line:3"] == "not a JSON object: line 3 is a int"
    assert {reasons["line:4"].split(":")[0], reasons["line:5"].split(":")[0]} == {"invalid JSON"}
    assert reasons["line:5"].startswith("invalid JSON: line 5:")
    assert reasons["nul"] == "image path contains a NUL byte"
    assert reasons["empty#0"] == "empty caption"


def test_bom_keeps_the_first_column(tmp_path: Path) -> None:
    for first in ("id", "image"):
        cols = ["id", "image", "caption"] if first == "id" else ["image", "id", "caption"]
        row = {"id": "007", "image": "a.png", "caption": "c"}
        (tmp_path / "m.csv").write_text(
            "\ufeff" + ",".join(cols) + "\n" + ",".join(row[c] for c in cols) + "\n",
            encoding="utf-8")
        assert [i.id for i in load_dataset(tmp_path / "m.csv").images] == ["007"]


def test_symlinks_cannot_lead_out_of_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "img").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"x")
    (root / "img" / "real.jpg").write_bytes(b"x")
    (root / "linkdir").symlink_to(outside)
    (root / "img" / "link.jpg").symlink_to(outside / "secret.jpg")
    (root / "img" / "alias.jpg").symlink_to(root / "img" / "real.jpg")
    (root / "m.csv").write_text(
        "id,image,caption\nok,img/real.jpg,c\ndir,linkdir/secret.jpg,c\nfile,img/link.jpg,c\n"
        f"alias,img/alias.jpg,c\nabs,{root / 'img/real.jpg'},c\n")
    ds = load_dataset(root / "m.csv")
    assert [(i.id, i.image) for i in ds.images] == [
        ("ok", "img/real.jpg"), ("alias", "img/real.jpg"), ("abs", "img/real.jpg")]
    assert {r.id: r.reason.split(":")[0] for r in ds.rejects} == {
        "dir": "image path escapes the dataset root", "file": "image path escapes the dataset root"}


def test_bad_files_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MissingError, match="dataset not found"):
        open_dataset(tmp_path / "none.csv")
    (tmp_path / "latin.csv").write_bytes("id,image,caption\n1,a.png,café\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin\.csv is not UTF-8 text \(line 2.*iconv -f latin1"):
        load_dataset(tmp_path / "latin.csv")
    (tmp_path / "latin.jsonl").write_bytes('{"image": "é.png"}\n'.encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        load_dataset(tmp_path / "latin.jsonl")
    for name, text in (("header.csv", "id,image,caption\n"), ("zero.csv", ""),
                       ("blank.jsonl", "\n\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match="empty|no data rows"):
            load_dataset(tmp_path / name)
    pq.write_table(pa.table({"image": pa.array([], pa.string())}), tmp_path / "none.parquet")
    with pytest.raises(InputError, match="no data rows"):
        load_dataset(tmp_path / "none.parquet")
    (tmp_path / "noimage.csv").write_text("id,caption\n1,c\n")
    with pytest.raises(InputError, match="no image column"):
        load_dataset(tmp_path / "noimage.csv")
    (tmp_path / "c.json").write_text('{"images": []}')
    with pytest.raises(InputError, match="annotations"):
        load_dataset(tmp_path / "c.json", format="coco")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="bad.parquet"):
        load_dataset(tmp_path / "bad.parquet")


def test_id_index_is_exact_when_hashes_collide() -> None:
    import numpy as np

    from embeddings.ingest.idindex import IdIndex
    index = IdIndex()
    ids = pa.array([f"id{i}" for i in range(40)], pa.large_string())
    h = np.full(40, 7, np.int64)  # every id shares one hash
    for lo in range(0, 40, 5):  # several levels, merged in tiers
        part = slice(lo, lo + 5)
        assert (index.find(h[part], ids[part]) == -1).all()
        index.add(h[part], ids[part], np.arange(lo, lo + 5), np.zeros(5, np.int64))
    found = index.find(h, ids)
    assert sorted(found) == list(range(40))
    assert (index.values(found)[0] == found).all()  # each id kept its own digest


def test_utf8_check_past_the_first_megabyte(tmp_path: Path) -> None:
    """The check skips all-ASCII megabytes; what follows them is still checked, with the
    right line, and a character split across two megabytes is still valid UTF-8."""
    line = "1,a.png,a caption of ascii text only\n"
    lines = (1 << 20) // len(line) + 1  # past the first megabyte read
    head = "id,image,caption\n" + line * lines
    (tmp_path / "late.csv").write_bytes(head.encode() + "2,b.png,café\n".encode("latin-1"))
    with pytest.raises(InputError, match=rf"late\.csv is not UTF-8 text \(line {lines + 2}"):
        load_dataset(tmp_path / "late.csv")
    body = ("id,image,caption\n" + line * (lines - 2)).encode() + b"2,b.png,"
    body += b"x" * ((1 << 20) - len(body) - 1) + "é\n".encode()  # 'é' straddles the boundary
    (tmp_path / "split.csv").write_bytes(body)
    assert len(load_dataset(tmp_path / "split.csv").captions) == lines - 1
    cut = body[:(1 << 20)] + b"x\n" + line.encode() * 3  # half a character, then ASCII
    (tmp_path / "cut.csv").write_bytes(cut)
    with pytest.raises(InputError, match=r"cut\.csv is not UTF-8"):
        load_dataset(tmp_path / "cut.csv")
