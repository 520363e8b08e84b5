"""Command line: ``python -m pipeline <command> --help`` (also installed as ``mmemb``).

A :class:`~embeddings.errors.UserError` (bad input, mismatched model, missing run, a
corrupt file, a full disk) is one ``error:`` line and exit status 2.  So are the
environment's refusals that reach this far: an out-of-memory error (naming the command
and what to lower, from its ``memory_hint``) and an ``OSError`` (a place that cannot be
read or written).  Anything else is a bug and keeps its traceback; ``-v`` shows every
traceback.

Fast start: this module and every ``*_cli`` module import at module level only the
standard library, :mod:`pipeline.config`, :mod:`pipeline.options` and the light parts of
``embeddings`` (errors, names, encoder specs).  A command imports its stage (torch,
FAISS, open_clip, sentence-transformers, Ray, the web stack) inside its handler, so
``--help`` and argument errors cost no model library (``tests/test_cli.py`` checks it).
A new command module keeps to that rule and adds its ``register(sub)`` to
``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Sequence

from embeddings.errors import UserError

from . import align_cli, dedup_cli, embed_cli, heads_cli, index_cli, latent_cli, serve_cli

# Each module registers its sub-commands with ``register(subparsers)``.
COMMAND_MODULES = (embed_cli, index_cli, heads_cli, align_cli, latent_cli, serve_cli,
                   dedup_cli)
MEMORY_HINT = "lower the batch size or work on a smaller run"


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
        _vouch(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader (head, less) went away: say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except UserError as e:
        return _fail(args, str(e))
    except MemoryError:
        hint = getattr(args, "memory_hint", MEMORY_HINT)
        return _fail(args, f"out of memory in `{args.command}`: {hint}")
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError":  # torch's CUDA / MPS out of memory
            raise
        hint = getattr(args, "memory_hint", MEMORY_HINT)
        return _fail(args, f"out of GPU memory in `{args.command}`: {hint}")
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return _fail(args, f"no space left on device ({e.filename or 'a write'}) in "
                         f"`{args.command}`: free some space (or inodes) and rerun")
        where = f" {e.filename}" if e.filename else ""
        return _fail(args, f"cannot use{where}: {e.strerror or e} (in `{args.command}`)")


def _vouch(args: argparse.Namespace) -> None:
    """The models the user's config names may be loaded from local code or files, even for
    a run not sealed on this machine (:func:`embeddings.encoders.vouch`)."""
    if not hasattr(args, "config"):
        return
    from embeddings.encoders import vouch

    from .config import config_models, load_toml

    vouch(config_models(load_toml(args.config)))


def _fail(args: argparse.Namespace, message: str) -> int:
    if args.verbose:
        raise
    print(f"error: {message}", file=sys.stderr)
    return 2
