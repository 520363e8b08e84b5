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
    RUN/index/<column>.<token>.ivfdata    its inverted lists, when too large for memory
    RUN/index/<column>.<token>.truth.npz  recall queries and their exact neighbours
    RUN/index/filters/                    cached split / label bitmaps (a cache)
    RUN/index/hits/manifest.json          per embed shard its hit table (size, digest)
    RUN/index/hits/<kind>.<block>.<token>.arrow  a shard's metadata, memory-mapped by search
    RUN/heads/models/NAME.json            a head's description (weights' name, size, digest)
    RUN/heads/models/NAME.<token>.safetensors
    RUN/heads/comparison.{csv,json,png}, confusion.png, splits.json, predictions/NAME.parquet
    RUN/align/NAME.json, NAME.<token>.safetensors    an adapter between two columns
    RUN/latent/NAME.json, NAME.<token>.safetensors   a latent (meta-space) model
    RUN/derived/manifest.json, <column>/part-<block>.<token>.parquet
                                          derived columns (the latent stage's), one part per
                                          embed shard, read with the run's columns (.derived)
    RUN/eval/retrieval.{json,md}
    RUN/eval/hybrid.json                  tuned weights of hybrid retrieval (sealed)
    RUN/dedup/groups.parquet, keep.parquet, sheet.png, summary.json (written last)
    RUN/serve/thumbs/<ab>/<key>.<digest>.jpg  thumbnails made by the web page
    RUN/serve/cache/<url>.<digest>.tar    remote tar shards thumbnails were read from (bounded)
    RUN/<stage>/.lock                     held (flock) by the one process writing that stage

Guarantees: every file appears by an atomic rename of a uniquely named temporary file
and takes the umask's mode; each stage is written by one process at a time; every shard,
index and head weight file is recorded with its size and ``xxh3_128`` digest and checked
before use (Parquet page checksums too); the JSON files read back carry a digest of their
content and this machine's seal (:mod:`.seal`); every path read from a run file must stay
inside its stage folder, and no link inside the run is followed (:mod:`.files`); files a
killed stage left unreferenced are removed when the stage next takes its lock; every
problem is a :class:`~embeddings.errors.UserError` naming the file and the remedy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import InputError
from .dedup import DedupFiles
from .derived import DerivedColumn, DerivedFiles, DerivedPart
from .embed import (
    KINDS,
    MODALITY_KIND,
    SCHEMA_VERSION,
    Column,
    EmbedFiles,
    EmbedManifest,
    RunIdentity,
    ShardRecord,
    column_name,
)
from .files import (
    DiskFull,
    Tampered,
    atomic_write_bytes,
    atomic_write_json,
    check_name,
    clean_temps,
    confined,
    digest_file,
    disk_errors,
    no_links,
    read_json,
    write_errors,
)
from .filters import FilterCache
from .index import IndexEntry, IndexFiles, ShardSpan
from .lock import StageLock, still_held
from .outputs import EvalFiles, HeadsFiles, ServeFiles, load_head_files, save_head_files
from .prints import PRINT_FIELDS, Fingerprints, prints_table, read_prints
from .provenance import Provenance, check_same_model
from .shards import FIELDS, ShardInfo, shard_bytes
from .trained import ADAPTER, LATENT, ModelFormat, TrainedFiles
from .verify import Report, verify_run


class Run:
    """A run directory and its stages' files: ``Run(path).embed.read_vectors("clip_image")``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        _check_run_path(self.path)
        self.embed = EmbedFiles(self.path)
        self.index = IndexFiles(self.path)
        self.heads = HeadsFiles(self.path)
        self.eval = EvalFiles(self.path)
        self.serve = ServeFiles(self.path)
        self.dedup = DedupFiles(self.path)
        self.filters = FilterCache(self.embed, self.index.dir / "filters")
        self.align = TrainedFiles(self.path, "align", ADAPTER)
        self.latent = TrainedFiles(self.path, "latent", LATENT)
        self.derived = self.embed.derived

    def lock(self, stage: str) -> StageLock:
        """The exclusive lock of one stage; once held, temporary files and the files a
        killed run of the stage left unreferenced are removed."""
        folder = self.path / check_name(stage, "stage")
        return _CleaningLock(self, folder, f"{self.path}/{stage}")

    def verify(self) -> list[str]:
        """Every bad or missing file of the run's embed, index and head files."""
        return verify_run(self).problems

    def report(self) -> Report:
        """:meth:`verify`, with the leftovers and notes (what ``verify`` prints)."""
        return verify_run(self)


def _check_run_path(path: Path) -> None:
    """A run directory must be a folder, or a path a folder can be made at."""
    if path.is_file():
        raise InputError(f"run directory {path} is a file: pass a directory to --run")
    for parent in path.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise InputError(f"run directory {path} cannot be made: {parent} is a file, "
                                 "not a folder: pass another --run")
            break


class _CleaningLock(StageLock):
    def __init__(self, run: Run, folder: Path, label: str) -> None:
        super().__init__(folder, label, root=run.path)
        self.run = run

    def __enter__(self) -> StageLock:
        super().__enter__()
        try:
            clean_temps(no_links(self.run.path, self.path.parent))
            stage = self.path.parent.name
            if stage == "index":
                self.run.index.clean()
                self.run.filters.clean()
                self.run.embed.hits.clean()
            elif stage == "heads":
                self.run.heads.clean()
            elif stage in ("align", "latent", "derived"):
                getattr(self.run, stage).clean()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self


def read_vectors(run: str | os.PathLike, column: str) -> np.ndarray:
    """All vectors of one embedding column as one contiguous float32 ``(n, dim)`` array."""
    return Run(run).embed.read_vectors(column)


def read_table(run: str | os.PathLike, kind: str, columns: list[str] | None = None) -> pa.Table:
    """Metadata columns of every ``kind`` (images | captions) row, as a pyarrow Table."""
    return Run(run).embed.read_table(kind, columns)


__all__ = ["FIELDS", "KINDS", "MODALITY_KIND", "PRINT_FIELDS", "SCHEMA_VERSION", "Column",
           "DedupFiles", "DerivedColumn", "DerivedFiles", "DerivedPart",
           "DiskFull", "EmbedFiles", "EmbedManifest", "EvalFiles", "FilterCache",
           "Fingerprints", "HeadsFiles", "IndexEntry", "IndexFiles", "ModelFormat", "Provenance",
           "Report", "Run", "RunIdentity", "ServeFiles", "ShardInfo", "ShardRecord", "ShardSpan",
           "StageLock", "Tampered", "TrainedFiles", "atomic_write_bytes", "atomic_write_json",
           "check_name",
           "check_same_model", "column_name", "confined", "digest_file", "disk_errors",
           "load_head_files", "prints_table", "read_json", "read_prints", "read_table",
           "read_vectors", "save_head_files", "shard_bytes", "still_held", "write_errors"]
