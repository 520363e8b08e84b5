"""Options every sub-command shares: the config file and the run directory."""

from __future__ import annotations

import argparse

from .config import DEFAULT_CONFIG


def common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"TOML config (default: {DEFAULT_CONFIG} when it exists)")
    p.add_argument("--run", help="run directory (default: the config's top-level `run`)")
