"""The dedup stage and the leakage guard on a real embedded run with planted duplicates.

The demo slice gets byte copies of some training images planted in test and val (leaks),
copies that stay inside one split (duplicates, not leaks), and a JPEG re-encode planted
in test (no equal digest: the perceptual hash finds it).  Expected groups and leaks come
from an independent oracle (sha256 of the files and the manifest's splits), so the counts
are checked exactly; ``--exclude-leaks`` is checked against the saved head's own
predictions on the test rows without the leaks.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from embeddings.errors import FormatError, InputError, RunMismatch, UserError
from embeddings.store import Run, read_prints
from embeddings.store.imported import VectorShard, write_vectors_run
from pipeline.cli import main
from pipeline.config import DedupConfig, EvalConfig, HeadsConfig
from pipeline.dedup import run_dedup
from pipeline.engine_ray import _pack, _unpack
from pipeline.evaluate import run_retrieval_eval
from pipeline.heads import run_heads
from pipeline.predict import run_predict

from .conftest import make_config, small_demo

pytestmark = pytest.mark.usefixtures("one_thread")


def _plant(data: Path) -> list[dict[str, str]]:
    """Add copies to the manifest (and their files); returns every row."""
    with open(data, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    plan = [(train[0], "test"), (train[1], "test"), (train[2], "test"), (train[3], "val"),
            (train[4], "val"), (train[5], "train"), (test[0], "test")]
    extra = []
    for k, (src, split) in enumerate(plan):
        path = Path(src["image"]).with_name(f"copy{k}_{Path(src['image']).name}")
        shutil.copy(data.parent / src["image"], data.parent / path)
        extra.append({**src, "id": f"{src['id']}_copy{k}", "image": str(path), "split": split})
    src = train[6]  # a JPEG re-encode planted in test: same picture, other bytes
    with Image.open(data.parent / src["image"]) as im:
        rgb = Image.new("RGB", im.size, "white")
        rgb.paste(im.convert("RGBA"), mask=im.convert("RGBA"))
    path = Path(src["image"]).with_name("reencoded.jpg")
    rgb.save(data.parent / path, format="JPEG", quality=90)
    extra.append({**src, "id": f"{src['id']}_jpeg", "image": str(path), "split": "test"})
    with open(data, "a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerows(extra)
    return rows + extra


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, encoder_specs) -> tuple[Path, list]:
    data = small_demo(tmp_path_factory.mktemp("dup-data"), per_class=5)
    rows = _plant(data)
    run = tmp_path_factory.mktemp("dup-run") / "run"
    from pipeline.embed import run_embed

    run_embed(make_config(data, run, encoder_specs))
    digests = {r["id"]: hashlib.sha256((data.parent / r["image"]).read_bytes()).hexdigest()
               for r in rows}
    return run, [(r["id"], r["split"], digests[r["id"]]) for r in rows]


def _oracle(rows: list) -> tuple[set[frozenset[str]], dict[str, int], set[str]]:
    """Groups of equal files, leaks per split, and the leaked ids."""
    by: dict[str, set[str]] = {}
    for i, _, d in rows:
        by.setdefault(d, set()).add(i)
    groups = {frozenset(g) for g in by.values() if len(g) > 1}
    split = {i: s for i, s, _ in rows}
    leaked = {i for g in groups if any(split[j] == "train" for j in g)
              for i in g if split[i] != "train"}
    counts = {s: sum(split[i] == s for i in leaked) for s in ("test", "val")}
    return groups, counts, leaked


def _groups(run: Path) -> set[frozenset[str]]:
    t = pq.read_table(run / "dedup" / "groups.parquet").to_pydict()
    out: dict[int, set[str]] = {}
    for g, i in zip(t["group"], t["id"]):
        out.setdefault(g, set()).add(i)
    return {frozenset(v) for v in out.values()}


def test_embed_records_fingerprints(planted) -> None:
    run, rows = planted
    reader = Run(run).embed.reader("images")
    prints = read_prints(reader)
    assert prints.known.all() and prints.missing == 0
    ids = reader.read_rows(np.arange(len(prints.known)), ["id"]).column(0).to_pylist()
    at = {i: k for k, i in enumerate(ids)}
    src = next(r for r in rows if r[0].endswith("_copy0"))[0].removesuffix("_copy0")
    a, b = at[src], at[f"{src}_copy0"]
    assert (prints.digests[a] == prints.digests[b]).all() and prints.phash[a] == prints.phash[b]
    jpeg = next(i for i, _, _ in rows if i.endswith("_jpeg"))
    s, j = at[jpeg.removesuffix("_jpeg")], at[jpeg]
    assert (prints.digests[s] != prints.digests[j]).any()
    assert bin(int(prints.phash[s]) ^ int(prints.phash[j])).count("1") <= 8
    assert prints.pixels[s] == prints.pixels[j] > 0


def test_digest_groups_and_leaks_are_exact(planted, tmp_path: Path, capsys) -> None:
    run0, rows = planted
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    assert main(["dedup", "--run", str(run), "--by", "digest", "--no-progress",
                 "--keep", "split"]) == 0
    out = capsys.readouterr().out
    groups, counts, _ = _oracle(rows)
    assert _groups(run) == groups
    summary = Run(run).dedup.summary()
    assert summary["leaks"] == counts and counts == {"test": 3, "val": 2}
    assert f"| test images with a copy in train | {counts['test']} |" in out
    keep = pq.read_table(run / "dedup" / "keep.parquet").column("id").to_pylist()
    assert len(keep) == len(rows) - sum(len(g) - 1 for g in groups)
    assert not any(i.endswith(("_copy0", "_copy1", "_copy2")) for i in keep)  # split rule
    report = pq.read_table(run / "dedup" / "groups.parquet").to_pydict()
    assert set(report["similarity"]) == {1.0}
    assert (run / "dedup" / "sheet.png").read_bytes().startswith(b"\x89PNG")
    # the perceptual hash adds the JPEG re-encode to its source's group
    run_dedup(DedupConfig(run=str(run), by=("digest", "phash"), progress=False))
    jpeg = next(i for i, _, _ in rows if i.endswith("_jpeg"))
    assert any({jpeg, jpeg.removesuffix("_jpeg")} <= g for g in _groups(run))
    # and the embeddings (exact search: no index) find at least the byte copies
    run_dedup(DedupConfig(run=str(run), by=("vector",), threshold=0.9999, progress=False))
    found = _groups(run)
    assert all(any(g <= f for f in found) for g in groups)


def test_exclude_leaks_changes_the_metrics(planted, tmp_path: Path) -> None:
    run0, rows = planted
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    run_dedup(DedupConfig(run=str(run), by=("digest",), progress=False))
    _, counts, leaked = _oracle(rows)
    cfg = HeadsConfig(run=str(run), inputs=("clip_image",), heads=("logistic",),
                      multilabel="", multitask=(), exclude_leaks=True)
    result = run_heads(cfg)
    note = next(n for n in result.notes if n.startswith("leaks:"))
    assert f"{counts['test']} test, {counts['val']} val" in note
    row = result.rows[0]
    assert row.eval_split == "test" and row.with_leaks["leaked"] == counts["test"]
    assert "accuracy +leaks" in result.table
    # the head's own predictions: accuracy on the test rows, with and without the leaks
    pred = pq.read_table(run_predict(run / "heads" / "models" / Path(row.model).name,
                                     run, tmp_path / "p.parquet").path).to_pydict()
    meta = Run(run).embed.read_table("images", ["id", "label"]).to_pydict()
    labels = dict(zip(meta["id"], meta["label"]))
    split = {i: s for i, s, _ in rows}
    test = [(p, labels[i], i in leaked) for i, p in zip(pred["id"], pred["label"])
            if split[i] == "test"]
    assert len(test) == row.with_leaks["rows"]
    acc_all = np.mean([p == y for p, y, _ in test])
    acc_clean = np.mean([p == y for p, y, bad in test if not bad])
    assert row.with_leaks["accuracy"] == pytest.approx(acc_all)
    assert row.accuracy == pytest.approx(acc_clean)
    # without the flag: counted, not excluded
    plain = run_heads(HeadsConfig(**{**cfg.__dict__, "exclude_leaks": False}))
    assert plain.rows[0].with_leaks is None
    assert plain.rows[0].accuracy == pytest.approx(acc_all)


def test_eval_retrieval_exclude_leaks(planted, tmp_path: Path) -> None:
    run0, rows = planted
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    with pytest.raises(InputError, match="dedup"):
        run_retrieval_eval(run, split="test", use_index=False, exclude_leaks=True)
    run_dedup(DedupConfig(run=str(run), by=("digest",), progress=False))
    _, counts, _ = _oracle(rows)
    report = run_retrieval_eval(run, split="test", use_index=False, exclude_leaks=True)
    assert report["leaks"] == {"test": counts["test"]}
    kept = next(r for r in report["results"] if r["leaks"] == "included")
    clean = next(r for r in report["results"] if r["leaks"] == "excluded")
    assert kept["queries"]["i2t"] - clean["queries"]["i2t"] == counts["test"]
    assert EvalConfig(exclude_leaks=True).exclude_leaks


def test_heads_dedup_uses_the_keep_list(planted, tmp_path: Path) -> None:
    run0, _rows = planted
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    cfg = HeadsConfig(run=str(run), inputs=("clip_image",), heads=("logistic",),
                      multilabel="", multitask=(), dedup=True)
    with pytest.raises(RunMismatch, match="pipeline dedup"):
        run_heads(cfg)
    run_dedup(DedupConfig(run=str(run), by=("digest",), keep=("split",), progress=False))
    full = run_heads(HeadsConfig(**{**cfg.__dict__, "dedup": False}))
    deduped = run_heads(cfg)
    # the split rule keeps the train copies: train rows lose only the train-train copy
    assert deduped.rows[0].rows == full.rows[0].rows - 1
    assert any("keep-list" in n for n in deduped.notes)


def test_run_without_fingerprints(tmp_path: Path, capsys) -> None:
    """A run written before fingerprints existed (imported vectors: none recorded)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    x[20:30] = x[:10] + 0.001
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    run = tmp_path / "old"
    write_vectors_run(run, {"old_image": 8}, [VectorShard(
        ids=[f"r{i}" for i in range(40)], vectors={"old_image": x},
        split=["train"] * 20 + ["test"] * 20)])
    assert main(["dedup", "--run", str(run), "--by", "digest", "--no-progress"]) == 2
    assert "no fingerprints" in capsys.readouterr().err
    assert main(["dedup", "--run", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "40 of 40 image rows have no fingerprints" in out
    assert Run(run).dedup.summary()["leaks"] == {"test": 10}
    # the keep-list is refused once the run gained shards it does not cover
    write_vectors_run(run, {}, [VectorShard(ids=["late"], vectors={"old_image": x[:1]},
                                            split=["test"])], append=True)
    from pipeline.leaks import kept_mask

    with pytest.raises(RunMismatch, match="rerun `python -m pipeline dedup`"):
        kept_mask(Run(run), 41)


def test_bad_knobs_and_tampered_report(planted, tmp_path: Path) -> None:
    run0, _ = planted
    for bad in (dict(by=("pixels",)), dict(keep=("largest",)), dict(threshold=2.0),
                dict(hash_distance=40), dict(k=1)):
        with pytest.raises(InputError):
            run_dedup(DedupConfig(run=str(run0), progress=False, **bad))
    with pytest.raises(InputError, match="caption"):
        run_dedup(DedupConfig(run=str(run0), column="clip_text", progress=False))
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    run_dedup(DedupConfig(run=str(run), by=("digest",), progress=False))
    path = run / "dedup" / "keep.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="rerun `python -m pipeline dedup`"):
        Run(run).dedup.keep_rows()
    assert any("dedup keep file" in p for p in Run(run).verify())
    elsewhere = tmp_path / "elsewhere.parquet"  # a link in the run is refused, not followed
    elsewhere.write_bytes(bytes(data))
    path.unlink()
    path.symlink_to(elsewhere)
    with pytest.raises(UserError, match="link"):
        Run(run).dedup.keep_rows()
    summary = run / "dedup" / "summary.json"  # an edited summary is refused
    summary.write_text(summary.read_text().replace('"largest": ', '"largest": 9'))
    with pytest.raises(FormatError, match="edited"):
        Run(run).dedup.summary()


def test_fast_path_records_the_same_fingerprints(tmp_path: Path, encoder_specs) -> None:
    """JPEGs through the fast path (batched decode, draft mode) and the exact path."""
    from pipeline.embed import run_embed

    data = tmp_path / "data"
    data.mkdir()
    lines = ["id,image,caption,label,split"]
    for k, name in enumerate(("astronaut", "coffee", "chelsea", "rocket")):
        im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        (data / f"{name}.jpg").write_bytes(buf.getvalue())
        lines.append(f"{name},{name}.jpg,a photo,{k % 2},train")
    (data / "manifest.csv").write_text("\n".join(lines) + "\n")
    got = {}
    for decode in ("exact", "fast"):
        run = tmp_path / decode
        run_embed(make_config(data / "manifest.csv", run, encoder_specs[:1], decode=decode))
        got[decode] = read_prints(Run(run).embed.reader("images"))
    a, b = got["exact"], got["fast"]
    assert a.known.all() and b.known.all()
    assert (a.digests == b.digests).all() and (a.pixels == b.pixels).all()
    assert max(bin(int(x) ^ int(y)).count("1") for x, y in zip(a.phash, b.phash)) <= 2


def test_ray_blocks_carry_fingerprints() -> None:
    import torch

    items = [(0, (torch.zeros(3, 2, 2),), None, (b"\x01" * 16, 5, 4)),
             (1, None, "unreadable image", None)]
    assert _unpack(_pack(items))[0][3] == (b"\x01" * 16, 5, 4)
    assert _unpack(_pack(items))[1] == (1, None, "unreadable image", None)


def test_serve_marks_hits_that_have_duplicates(planted, tmp_path: Path) -> None:
    from pipeline.config import IndexConfig
    from pipeline.index import run_index
    from pipeline.serve import ServeConfig, Service

    run0, rows = planted
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    run_index(IndexConfig(run=str(run), columns=("clip_image",), progress=False))
    src = next(i for i, _, _ in rows if i.endswith("_copy0")).removesuffix("_copy0")
    service = Service(ServeConfig(run=str(run), device="cpu"))
    hits = service.similar(src, "image", "image", 5).hits
    assert all(h.duplicates is None for h in hits)  # no dedup report: nothing marked
    run_dedup(DedupConfig(run=str(run), by=("digest",), progress=False))
    service = Service(ServeConfig(run=str(run), device="cpu"))
    hits = {h.id: h for h in service.similar(src, "image", "image", 5).hits}
    assert hits[src].duplicates == [f"{src}_copy0"]
    assert hits[f"{src}_copy0"].duplicates == [src]
    groups, _, _ = _oracle(rows)
    alone = [h for i, h in hits.items() if not any(i in g for g in groups)]
    assert all(h.duplicates is None for h in alone)


def test_index_dedup_searches_the_keep_list(planted, tmp_path: Path, capsys) -> None:
    from pipeline.search import search

    run0, rows = planted
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    src = next(i for i, _, _ in rows if i.endswith("_copy0")).removesuffix("_copy0")
    assert main(["index", "--run", str(run), "--columns", "clip_image", "--no-progress",
                 "--dedup"]) == 2
    assert "pipeline dedup" in capsys.readouterr().err
    run_dedup(DedupConfig(run=str(run), by=("digest",), progress=False))
    assert main(["index", "--run", str(run), "--columns", "clip_image", "--no-progress",
                 "--dedup"]) == 0
    assert "dedup keep-list" in capsys.readouterr().out
    groups, _, _ = _oracle(rows)
    dropped = {i for g in groups for i in sorted(g)[1:]}  # rule first: the earliest row
    hits = search(run, image=None, text="a drawing", column="clip_image", k=len(rows),
                  device="cpu").hits
    ids = {h.id for h in hits}
    assert len(hits) == len(rows) - len(dropped) and src in ids
    assert f"{src}_copy0" not in ids
    assert main(["index", "--run", str(run), "--columns", "clip_image", "--no-progress",
                 "--no-dedup"]) == 0
    hits = search(run, image=None, text="a drawing", column="clip_image", k=len(rows),
                  device="cpu").hits
    assert len(hits) == len(rows)


def test_page_marks_duplicates_in_chromium(planted, tmp_path: Path) -> None:
    """The search page draws a hit with duplicates framed, listing them (real Chromium)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from tests._serve_fixtures import serving
    from tests.test_page import ARGS, CHROMIUM, _until

    if not CHROMIUM.exists():
        pytest.skip("no browser: /usr/bin/chromium is missing (apt-get install chromium)")
    from pipeline.config import IndexConfig
    from pipeline.index import run_index

    run0, rows = planted
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    run_index(IndexConfig(run=str(run), columns=("clip_image",), progress=False))
    run_dedup(DedupConfig(run=str(run), by=("digest",), progress=False))
    src = next(i for i, _, _ in rows if i.endswith("_copy0")).removesuffix("_copy0")
    with serving(run) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        pg = browser.new_page()
        pg.goto(url)
        _until(pg, "() => document.getElementById('models').textContent.includes('clip =')")
        pg.fill("#k", str(len(rows)))
        pg.fill("#q", "a drawing")
        pg.press("#q", "Enter")
        _until(pg, f"() => document.querySelectorAll('.card').length === {len(rows)}")
        marked = pg.eval_on_selector_all(
            ".card.dup", "cs => cs.map(c => [c.dataset.id, c.querySelector('.dups')"
            ".textContent])")
        browser.close()
    groups, _, _ = _oracle(rows)
    assert {i for i, _ in marked} == {i for g in groups for i in g}
    assert dict(marked)[src] == f"duplicates: {src}_copy0"


def test_vectors_per_ivf_list_and_through_the_index(planted, tmp_path: Path) -> None:
    """On an IVF index the default compares pairs within each row's nearest lists; the
    k-NN graph through the index and exact search find the same byte copies."""
    from pipeline.config import IndexConfig
    from pipeline.index import run_index

    run0, rows = planted
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    groups, _, _ = _oracle(rows)
    found = {}
    for method in ("exact", "auto", "index"):
        if method == "auto":
            run_index(IndexConfig(run=str(run), columns=("clip_image",), factory="IVF4,Flat",
                                  progress=False))
        info = run_dedup(DedupConfig(run=str(run), by=("vector",), threshold=0.9999,
                                     method=method, lists=4, progress=False)).summary
        found[method] = _groups(run)
        assert all(any(g <= f for f in found[method]) for g in groups), method
        assert ("lists of IVF4,Flat" in info["signals"]["vector"]) == (method == "auto")
    # every list compared (lists=4 of 4): exactly the pairs exact search finds
    assert found["auto"] == found["exact"]
    with pytest.raises(InputError, match="IVF"):
        shutil.rmtree(run / "index")
        run_index(IndexConfig(run=str(run), columns=("clip_image",), progress=False))
        run_dedup(DedupConfig(run=str(run), by=("vector",), method="clusters", progress=False))
