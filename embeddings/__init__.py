"""Library: encoders, batched encoding, Parquet shard I/O (arrays in, arrays out, no CLI)."""

from .shards import read_manifest, read_table, read_vectors

__version__ = "0.1.0"
__all__ = ["read_manifest", "read_table", "read_vectors"]
