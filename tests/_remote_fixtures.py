"""Real servers on loopback for the remote sources: a static HTTP server (with a redirect
out of the root and a flaky path) and moto's S3-compatible server read through s3fs."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar


class Handler(SimpleHTTPRequestHandler):
    """Static files, plus ``/away/...`` (302 to another host) and ``/flaky/...`` (503 for
    the first ``failures`` requests of each path, then the file)."""

    failures = 0
    seen: ClassVar[dict[str, int]] = {}

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/away/"):
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.2:9/" + self.path[6:])
            self.end_headers()
            return
        if self.path.startswith("/flaky/"):
            n = Handler.seen[self.path] = Handler.seen.get(self.path, 0) + 1
            if n <= Handler.failures:
                self.send_error(503, "try again")
                return
            self.path = self.path[6:]
        super().do_GET()


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on a free 127.0.0.1 port; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(Handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free port, with the environment s3fs reads (a test key pair,
    the endpoint); yields the endpoint URL.  The environment is restored afterwards."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield url
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def upload(folder: Path, bucket_url: str) -> None:
    """Every file under ``folder`` to ``s3://bucket/prefix/...`` (the bucket is made)."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = bucket_url.removeprefix("s3://").split("/")[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fs.pipe(f"{bucket_url.rstrip('/')}/{path.relative_to(folder).as_posix()}",
                    path.read_bytes())
