"""A served copy of the demo run and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from embeddings.store import Run
from pipeline.config import IndexConfig
from pipeline.index import run_index
from pipeline.serve import ServeConfig, Service
from pipeline.serve_app import create_app

# Small caps so the over-the-limit cases stay fast.
MAX_UPLOAD_BYTES = 200_000
MAX_UPLOAD_PIXELS = 4_000_000


def served_copy(demo_run: Path, base: Path) -> tuple[Path, str]:
    """A copy of the run with its own copy of the dataset, indexed; one image row's file is
    replaced by a symlink to a file outside the dataset root.  Returns (run, that row's id)."""
    run, data, outside = base / "run", base / "data", base / "outside"
    shutil.copytree(demo_run, run)
    manifest_path = Run(run).embed.manifest_path
    manifest = json.loads(manifest_path.read_text())
    shutil.copytree(manifest["dataset"]["root"], data)
    manifest["dataset"]["root"] = manifest["dataset"]["image_source"]["root"] = str(data)
    manifest_path.write_text(json.dumps(manifest))
    rows = Run(run).embed.read_table("images", ["id", "image"]).to_pydict()
    outside.mkdir()
    secret = outside / "secret.png"
    shutil.copy(data / rows["image"][1], secret)
    (data / rows["image"][-1]).unlink()
    (data / rows["image"][-1]).symlink_to(secret)
    run_index(IndexConfig(run=str(run)))
    return run, rows["id"][-1]


def service(run: Path) -> Service:
    return Service(ServeConfig(run=str(run), device="cpu", max_upload_bytes=MAX_UPLOAD_BYTES,
                               max_upload_pixels=MAX_UPLOAD_PIXELS))


@contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def serving(run: Path) -> Iterator[str]:
    with running(create_app(service(run))) as url:
        yield url
