"""Sub-command ``serve``: the search page and JSON API over a run."""

from __future__ import annotations

import argparse
import logging
import socket
from typing import Any

from embeddings.errors import InputError

from .config import DEFAULT_CONFIG, load_toml

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="search web page and JSON API over a run",
        description="Serve a run on http://HOST:PORT/: a search page (text box, image "
        "drop, thumbnail grid, click a result for more like it) and its JSON API "
        "(/api/search, /api/search/image, /api/similar, /api/thumb, /api/health; docs at "
        "/docs). Indexes are memory-mapped once at start, query encoders loaded on first "
        "use. Binds to loopback unless --host says otherwise.",
        epilog="example: python -m pipeline serve --run runs/demo --port 8000")
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="TOML config; its `out` is the run (default: %(default)s)")
    p.add_argument("--run", "--out", dest="run", help="run directory (default: config's out)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s; anything else is reachable "
                   "from other machines)")
    p.add_argument("--port", type=int, default=8000,
                   help="port (default: %(default)s; 0: any free port)")
    p.add_argument("--device", default="auto", help="device for the query encoders")
    p.add_argument("--threads", type=int, help="torch threads per query encoding (default: "
                   "torch's, one per core; 1 is faster on a machine busy with other work)")
    p.add_argument("--max-upload-mb", type=float, default=8.0,
                   help="largest image upload in MiB (default: %(default)s)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    # The web stack is imported here so other commands do not pay for it.
    import uvicorn

    from .serve import ServeConfig, Service
    from .serve_app import create_app, is_loopback

    run = args.run or load_toml(args.config).get("out", "runs/demo")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be between 0 and 65535, not {args.port}")
    if args.max_upload_mb <= 0:
        raise InputError(f"--max-upload-mb must be positive, not {args.max_upload_mb}")
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be >= 1, not {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if not is_loopback(args.host):
        log.warning("warning: binding to %s, not loopback: anyone who can reach this "
                    "machine can search this run and see its images", args.host)
    service = Service(ServeConfig(run=run, device=args.device,
                                  max_upload_bytes=int(args.max_upload_mb * 2**20)))
    for column, problem in service.problems.items():
        log.warning("%s: %s", column, problem)
    sock = _listen(args.host, args.port)  # bound before we say so: errors are ours
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {run} on http://{shown}:{sock.getsockname()[1]}/ (API docs: /docs; "
          "Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(service, args.host),
                                           log_level="warning", access_log=False))
    server.run(sockets=[sock])
    return 0


def _listen(host: str, port: int) -> socket.socket:
    address = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
