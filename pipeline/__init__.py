"""Orchestration: configs, stages and the command line over the ``embeddings`` library.

Python API::

    from pipeline import embed
    result = embed("configs/offline.toml", run="runs/mine")
"""

from __future__ import annotations

from typing import Any

from .config import EmbedConfig, embed_config, load_toml
from .embed import EmbedResult, run_embed

__all__ = ["EmbedConfig", "EmbedResult", "embed", "embed_config", "load_toml", "run_embed"]


def embed(config: str = "configs/default.toml", run: str | None = None,
          **overrides: Any) -> EmbedResult:
    """Run the embed stage from a config file with keyword overrides (as the CLI does)."""
    return run_embed(embed_config(load_toml(config), run=run, **overrides))
