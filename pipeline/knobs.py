"""Declaring a config knob once: a dataclass field carrying its help text, CLI flag and
choices (:mod:`.config` derives the TOML sections and argparse options from them)."""

from __future__ import annotations

from dataclasses import field
from typing import Any

DEFAULT_RUN = "runs/default"


def knob(default: Any, help: str, *, flag: str | None = None, cli: bool = True,
         choices: tuple[Any, ...] | None = None) -> Any:
    """A config field: default, help text, optional CLI flag name and choices."""
    meta = {"help": help, "flag": flag, "cli": cli, "choices": choices}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)
