"""Library: encoders, batched encoding, the run-directory store, indexes and heads
(arrays in, arrays out; no CLI, never imports ``pipeline``).

Importing the package imports nothing heavy: ``Run``, ``read_table`` and ``read_vectors``
load the store (pyarrow, numpy) on first use, so the command line starts fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"
__all__ = ["Run", "read_table", "read_vectors"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module 'embeddings' has no attribute {name!r}")
