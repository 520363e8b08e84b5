"""Search from the command line and retrieval evaluation on a multi-caption dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embeddings import read_table, read_vectors
from embeddings.encoders import EncoderSpec
from embeddings.store import Run
from pipeline.cli import main
from pipeline.config import IndexConfig
from pipeline.embed import run_embed
from pipeline.evaluate import run_retrieval_eval
from pipeline.index import run_index
from pipeline.search import pick_column, search
from tests._index_fixtures import karpathy_dataset
from tests.conftest import make_config


@pytest.fixture(scope="module")
def run(demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("search") / "run"
    shutil.copytree(demo_run, out)
    run_index(IndexConfig(run=str(out)))
    return out


def _search_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["search", *argv, "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_text_to_text_json_matches_shard_rows(run: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    table = read_table(run, "captions").to_pydict()
    query = table["caption"][10]
    out = _search_json(capsys, "--run", str(run), query, "--modality", "text", "--k", "4")
    assert out["column"] == "minilm_text"  # a text model is preferred for text->text
    assert [h["rank"] for h in out["hits"]] == [1, 2, 3, 4]
    for h in out["hits"]:
        assert h["id"] == table["id"][h["row"]] and h["caption"] == table["caption"][h["row"]]
    assert out["hits"][0]["row"] == 10
    scores = [h["score"] for h in out["hits"]]
    assert scores == sorted(scores, reverse=True)


def test_table_output_and_filters(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "--run", str(run), "a red bicycle", "--k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("clip_image: 'a red bicycle' (3 hits)")
    assert lines[1].split() == ["rank", "score", "id", "caption", "image", "label"]
    assert len(lines) == 5
    images = read_table(run, "images").to_pydict()
    label = images["label"][0]
    out = _search_json(capsys, "--run", str(run), "anything", "--k", "5", "--label", label,
                       "--split", "test")
    want = sum(lb == label and s == "test" for lb, s in zip(images["label"], images["split"]))
    assert len(out["hits"]) == min(5, want) > 0
    assert all(h["label"] == label and h["split"] == "test" for h in out["hits"])


def test_image_queries_both_ways(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = read_table(run, "images").to_pydict()
    path = Path(Run(run).embed.manifest().dataset["root"]) / images["image"][7]
    same = _search_json(capsys, "--run", str(run), "--image", str(path), "--k", "2")
    assert same["column"] == "clip_image" and same["hits"][0]["row"] == 7
    text = _search_json(capsys, "--run", str(run), "--image", str(path), "--modality", "text")
    assert text["column"] == "clip_text" and len(text["hits"]) == 10
    assert all(h["caption"] for h in text["hits"])
    with pytest.raises(ValueError, match="cannot embed image queries"):
        pick_column(run, query="image", column="minilm_text")


def test_k_larger_than_the_index_is_clamped(run: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "--run", str(run), "cat", "--k", "1000", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert len(out["hits"]) == 72 and out["k"] == 72
    assert "k=1000 is more than the 72 vectors" in captured.err
    assert "k=1000 is more than the 72 vectors" in out["notes"][0]


@pytest.mark.parametrize(("argv", "message"), [
    (["   "], "empty query"),
    ([], "give exactly one query"),
    (["cat", "--k", "0"], "--k must be >= 1"),
    (["--image", "/no/such.png"], "no such file"),
    (["cat", "--column", "nope"], "no embedding column 'nope'"),
    (["cat", "--image", "x.png"], "not both"),
])
def test_bad_queries_exit_2(run: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                            message: str) -> None:
    before = (run / "index" / "manifest.json").read_bytes()
    assert main(["search", "--run", str(run), *argv]) == 2
    assert message in capsys.readouterr().err
    assert (run / "index" / "manifest.json").read_bytes() == before


def test_unreadable_query_image(run: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    assert main(["search", "--run", str(run), "--image", str(bad)]) == 2
    assert "cannot use query image" in capsys.readouterr().err


def test_missing_index(demo_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "--run", str(demo_run), "cat"]) == 2
    err = capsys.readouterr().err
    assert "no index for column clip_image" in err and "make index" in err
    assert not (demo_run / "index").exists()


# ------------------------------------------------------------------ retrieval evaluation

@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory,
          encoder_specs: tuple[EncoderSpec, ...]) -> tuple[Path, int]:
    base = tmp_path_factory.mktemp("karpathy")
    path, orphans = karpathy_dataset(base / "data", per_class=2, captions=3)
    out = base / "run"
    run_embed(make_config(path, out, encoder_specs[:1], dtype="float32"))
    run_index(IndexConfig(run=str(out)))
    return out, orphans


def _brute_force(run: Path, split: str | None) -> dict[str, list[float]]:
    """Recall@1/5/10 by a plain per-query loop over numpy arrays (no shared code)."""
    images = read_table(run, "images").to_pylist()
    caps = read_table(run, "captions").to_pylist()
    img = read_vectors(run, "clip_image").astype(np.float64)
    txt = read_vectors(run, "clip_text").astype(np.float64)
    gallery = [i for i, r in enumerate(images) if split in (None, r["split"])]
    row = {images[i]["id"]: i for i in gallery}
    queries = [(c, row[r["image_id"]]) for c, r in enumerate(caps)
               if r["image_id"] in row and split in (None, r["split"])]
    t2i = []
    for c, i in queries:
        order = [gallery[j] for j in np.argsort(-(img[gallery] @ txt[c]), kind="stable")]
        t2i.append(order.index(i))
    cap_rows = [c for c, _ in queries]
    owner = dict(queries)
    i2t = []
    for i in sorted(set(owner.values())):
        order = [cap_rows[j] for j in np.argsort(-(txt[cap_rows] @ img[i]), kind="stable")]
        i2t.append(min(r for r, c in enumerate(order) if owner[c] == i))
    return {"t2i": [float(np.mean(np.array(t2i) < k)) for k in (1, 5, 10)],
            "i2t": [float(np.mean(np.array(i2t) < k)) for k in (1, 5, 10)]}


@pytest.mark.parametrize("split", [None, "test"])
def test_retrieval_recall_matches_brute_force(multi: tuple[Path, int], split: str | None) -> None:
    run, orphans = multi
    report = run_retrieval_eval(run, split=split)
    assert report["excluded"]["captions_without_image"] == orphans  # the broken image's
    want = _brute_force(run, split)
    exact, via_index = report["results"]
    assert (exact["method"], via_index["method"]) == ("exact", "index")
    for direction in ("t2i", "i2t"):
        got = [exact[direction][f"R@{k}"] for k in (1, 5, 10)]
        assert got == pytest.approx(want[direction], abs=1e-9), direction
        assert via_index[direction] == exact[direction]  # Flat index: exactly the same
    n_img = len([r for r in read_table(run, "images").to_pylist()
                 if split in (None, r["split"])])
    assert exact["queries"] == {"t2i": 3 * n_img, "i2t": n_img}


def test_eval_cli_writes_the_table(multi: tuple[Path, int],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = multi
    assert main(["eval-retrieval", "--run", str(run), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "| clip | exact |" in out and "| clip | index (Flat) |" in out
    saved = json.loads((run / "eval" / "retrieval.json").read_text())
    assert saved["split"] == "test" and len(saved["results"]) == 2
    assert (run / "eval" / "retrieval.md").read_text().strip() == out.strip()
    assert main(["eval-retrieval", "--run", str(run), "--encoders", "minilm"]) == 2
    assert "no image+text columns" in capsys.readouterr().err


def test_python_api_equals_cli(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api = search(run, text="a green tree", k=3, device="cpu").to_dict()
    assert _search_json(capsys, "--run", str(run), "a green tree", "--k", "3") == api
