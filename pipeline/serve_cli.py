"""Sub-command ``serve``: the search page and JSON API over a run."""

from __future__ import annotations

import argparse
import logging
import socket
from pathlib import Path
from typing import Any

from embeddings.errors import InputError

from .config import ServerConfig, load_toml, stage_config
from .options import add_options, common_options, overrides

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
    common_options(p)
    add_options(p, ServerConfig)
    p.set_defaults(func=_serve, memory_hint="serve with fewer indexed columns or a smaller "
                   "run")


def _serve(args: argparse.Namespace) -> int:
    # The web stack is imported here so other commands do not pay for it.
    import uvicorn

    from .serve import ServeConfig, Service
    from .serve_app import create_app, is_loopback
    from .serve_warm import warm

    cfg = stage_config(ServerConfig, "serve", load_toml(args.config), args.run,
                       **overrides(args, ServerConfig))
    run = cfg.run
    if not 0 <= cfg.port <= 65535:
        raise InputError(f"--port must be between 0 and 65535, not {cfg.port}")
    if cfg.max_upload_mb <= 0:
        raise InputError(f"--max-upload-mb must be positive, not {cfg.max_upload_mb}")
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise InputError(f"--threads must be >= 1, not {cfg.threads}")
        import torch

        torch.set_num_threads(cfg.threads)
    if not is_loopback(cfg.host):
        log.warning("warning: binding to %s, not loopback: anyone who can reach this "
                    "machine can search this run and see its images", cfg.host)
    if cfg.root is not None and "://" not in cfg.root and not Path(cfg.root).is_dir():
        raise InputError(f"--root {cfg.root} is not a folder: name the folder of the images "
                         "(or of the tar shards), or a remote root such as s3://bucket/prefix")
    service = Service(ServeConfig(run=run, device=cfg.device, root=cfg.root,
                                  max_upload_bytes=int(cfg.max_upload_mb * 2**20)))
    if service.root_problem:
        log.warning("warning: %s", service.root_problem.removeprefix("refused: "))
    for column, problem in service.problems.items():
        log.warning("%s: %s", column, problem)
    warm(service)  # first-use imports and reads now, not in the first queries
    sock = _listen(cfg.host, cfg.port)  # bound before we say so: errors are ours
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"serving {run} on http://{shown}:{sock.getsockname()[1]}/ (API docs: /docs; "
          "Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(service, cfg.host),
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
