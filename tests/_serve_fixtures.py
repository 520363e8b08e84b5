"""A served copy of the demo run and a real uvicorn server on a free loopback port."""

from __future__ import annotations

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
from tests._tamper import edit

# Small caps so the over-the-limit cases stay fast.
MAX_UPLOAD_BYTES = 200_000
MAX_UPLOAD_PIXELS = 4_000_000


def served_copy(demo_run: Path, base: Path) -> tuple[Path, str]:
    """A copy of the run with its own copy of the dataset, indexed; one image row's file is
    replaced by a symlink to a file outside the dataset root.  Returns (run, that row's id)."""
    run, data, outside = base / "run", base / "data", base / "outside"
    shutil.copytree(demo_run, run)
    files = Run(run).embed
    shutil.copytree(files.manifest().root, data)  # the dataset moved: embed records it so

    def moved(m: dict) -> None:
        m["dataset"].update(root=str(data))
        m["dataset"]["image_source"].update(root=str(data))
    edit(files.manifest_path, moved, sealed=True)
    edit(files.spec_path, lambda s: s["spec"]["data"].update(root=str(data)), sealed=True)
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
