"""Kept for existing imports: the ingest lives in :mod:`embeddings.ingest`."""

from .ingest import *  # noqa: F403
from .ingest import __all__  # noqa: F401
