"""Command line: ``python -m pipeline <command> --help`` (also installed as ``mmemb``).

A :class:`~embeddings.errors.UserError` (bad input, mismatched model, missing run, a
corrupt file, a full disk) is one ``error:`` line and exit status 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from embeddings.errors import UserError

from . import align_cli, embed_cli, heads_cli, index_cli, serve_cli

# Each module registers its sub-commands with ``register(subparsers)``.
COMMAND_MODULES = (embed_cli, index_cli, heads_cli, align_cli, serve_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Embed image/text datasets, index them, train fusion heads, search.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and tracebacks for every error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our loggers speak at INFO; libraries (open_clip logs to the root logger) only warn.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(message)s", stream=sys.stderr, force=True)
    for ours in ("pipeline", "embeddings"):
        logging.getLogger(ours).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader (head, less) went away: say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except UserError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
