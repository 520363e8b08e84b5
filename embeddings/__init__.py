"""Library: encoders, batched encoding, the run-directory store, indexes and heads
(arrays in, arrays out; no CLI, never imports ``pipeline``)."""

from .store import Run, read_table, read_vectors

__version__ = "0.2.0"
__all__ = ["Run", "read_table", "read_vectors"]
