"""Orchestration: configs, stages and the command line over the ``embeddings`` library.

Python API::

    from pipeline import embed
    result = embed("configs/offline.toml", run="runs/mine")

Importing the package loads no model library (the stages import theirs when they run).
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .embed import EmbedResult

__all__ = ["EmbedConfig", "EmbedResult", "embed", "embed_config", "load_toml", "run_embed"]


def embed(config: str = "configs/default.toml", run: str | None = None,
          **overrides: Any) -> EmbedResult:
    """Run the embed stage from a config file with keyword overrides (as the CLI does)."""
    from .config import embed_config, load_toml
    from .embed import run_embed

    return run_embed(embed_config(load_toml(config), run=run, **overrides))


def __getattr__(name: str) -> Any:
    if name in ("EmbedConfig", "embed_config", "load_toml"):
        from . import config

        return getattr(config, name)
    if name in ("EmbedResult", "run_embed"):
        from . import embed as stage

        return getattr(stage, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


class _Package(types.ModuleType):
    """The stage module ``pipeline.embed`` shares its name with the function above; the
    import system sets a submodule as an attribute of its package when it is first
    imported, which would replace the function.  The function stays (as it did when the
    package imported the stage eagerly); the module is ``sys.modules["pipeline.embed"]``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "embed" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
