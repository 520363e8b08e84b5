"""Command-line options: those every sub-command shares (the config file, the run
directory) and those derived from a config section's knobs (one option per field)."""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields
from typing import Any

from .config import DEFAULT_CONFIG, optional_base


def common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"TOML config (default: {DEFAULT_CONFIG} when it exists)")
    p.add_argument("--run", help="run directory (default: the config's top-level `run`)")


def add_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One option per CLI knob of ``cls`` (``--batch-size``, ``--no-mmap``, ...)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = f.metadata
        if not meta or not meta.get("cli") or f.name in skip:
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if optional_base(hints[f.name]) is bool:
            parser.add_argument(flag, dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction,
                                help=f"{meta['help']} (default: {default})")
            continue
        kind = _arg_type(hints[f.name])
        shown = ",".join(default) if isinstance(default, tuple) else default
        parser.add_argument(flag, dest=f.name, default=None, type=kind, choices=meta["choices"],
                            help=f"{meta['help']} (default: {shown})")


def _arg_type(hint: Any) -> Any:
    base = optional_base(hint)
    if typing.get_origin(base) is tuple:
        return str  # comma-separated; _coerce splits it
    return base if base in (int, float, str) else str


def overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values the user gave on the command line for ``cls``'s knobs."""
    return {f.name: getattr(args, f.name) for f in fields(cls)
            if f.metadata.get("cli") and getattr(args, f.name, None) is not None}
