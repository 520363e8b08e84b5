"""The run directory: the only code that knows its paths, schemas, manifests and locks.

Layout of a run ``RUN`` (schema version 2; a run of another version is refused with a
clear message)::

    RUN/embed/manifest.json               written last; lists every shard (rows, bytes, digest)
    RUN/embed/config.json                 the run's config and encoder provenance (its identity)
    RUN/embed/rejects.jsonl               {"kind", "id", "reason"} per skipped item
    RUN/embed/images/part-00000.parquet   block 0: one row per image
    RUN/embed/captions/part-00000.parquet block 0: one row per caption of those images
    RUN/index/manifest.json               one entry per column: file, bytes, digest, shards covered
    RUN/index/<column>.<token>.faiss      one FAISS index per embedding column
    RUN/heads/models/NAME.json            a head's description (weights' name, size, digest)
    RUN/heads/models/NAME.<token>.safetensors
    RUN/heads/comparison.{csv,json,png}, confusion.png, splits.json, predictions/NAME.parquet
    RUN/align/NAME.json, NAME.<token>.safetensors    an adapter between two columns
    RUN/latent/NAME.json, NAME.<token>.safetensors   a latent (meta-space) model
    RUN/eval/retrieval.{json,md}
    RUN/serve/thumbs/                     thumbnails made by the web page
    RUN/<stage>/.lock                     held (flock) by the one process writing that stage

Guarantees: every file appears by an atomic rename of a uniquely named temporary file
and takes the umask's mode; each stage is written by one process at a time; every shard,
index and head weight file is recorded with its size and ``xxh3_128`` digest and checked
before use (Parquet page checksums too); every path read from a run file must resolve
inside its stage folder; every problem is a :class:`~embeddings.errors.UserError` naming
the file and the remedy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import InputError
from .embed import (
    FIELDS,
    KINDS,
    MODALITY_KIND,
    SCHEMA_VERSION,
    Column,
    EmbedFiles,
    EmbedManifest,
    RunIdentity,
    ShardInfo,
    ShardRecord,
    column_name,
    shard_bytes,
)
from .files import (
    DiskFull,
    atomic_write_bytes,
    atomic_write_json,
    check_name,
    clean_temps,
    confined,
    digest_file,
    disk_errors,
    read_json,
)
from .index import IndexEntry, IndexFiles, ShardSpan
from .lock import StageLock
from .outputs import EvalFiles, HeadsFiles, ServeFiles, load_head_files, save_head_files
from .provenance import Provenance, check_same_model
from .trained import ADAPTER, LATENT, ModelFormat, TrainedFiles


class Run:
    """A run directory and its stages' files: ``Run(path).embed.read_vectors("clip_image")``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"run directory {self.path} is a file: pass a directory to --run")
        self.embed = EmbedFiles(self.path)
        self.index = IndexFiles(self.path)
        self.heads = HeadsFiles(self.path)
        self.eval = EvalFiles(self.path)
        self.serve = ServeFiles(self.path)
        self.align = TrainedFiles(self.path, "align", ADAPTER)
        self.latent = TrainedFiles(self.path, "latent", LATENT)

    def lock(self, stage: str) -> StageLock:
        """The exclusive lock of one stage; stale temporary files are removed once held."""
        folder = self.path / check_name(stage, "stage")
        return _CleaningLock(folder, f"{self.path}/{stage}")

    def verify(self) -> list[str]:
        """Every bad or missing file of the run's embed, index and head files."""
        problems = self.embed.verify() if self.embed.has_manifest() else []
        problems += self.index.verify()
        if self.heads.models.is_dir():
            for desc in sorted(self.heads.models.glob("*.json")):
                try:
                    load_head_files(desc)
                except Exception as e:  # every problem is listed, none stops the check
                    problems.append(str(e))
        return problems + self.align.verify() + self.latent.verify()


class _CleaningLock(StageLock):
    def __enter__(self) -> StageLock:
        super().__enter__()
        clean_temps(self.path.parent)
        return self


def read_vectors(run: str | os.PathLike, column: str) -> np.ndarray:
    """All vectors of one embedding column as one contiguous float32 ``(n, dim)`` array."""
    return Run(run).embed.read_vectors(column)


def read_table(run: str | os.PathLike, kind: str, columns: list[str] | None = None) -> pa.Table:
    """Metadata columns of every ``kind`` (images | captions) row, as a pyarrow Table."""
    return Run(run).embed.read_table(kind, columns)


__all__ = ["FIELDS", "KINDS", "MODALITY_KIND", "SCHEMA_VERSION", "Column", "DiskFull",
           "EmbedFiles", "EmbedManifest", "EvalFiles", "HeadsFiles", "IndexEntry", "IndexFiles",
           "ModelFormat", "Provenance", "Run", "RunIdentity", "ServeFiles", "ShardInfo",
           "ShardRecord", "ShardSpan",
           "StageLock", "TrainedFiles", "atomic_write_bytes", "atomic_write_json", "check_name",
           "check_same_model", "column_name", "confined", "digest_file", "disk_errors",
           "load_head_files", "read_json", "read_table", "read_vectors",
           "save_head_files",
           "shard_bytes"]
