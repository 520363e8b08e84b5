"""Files of the dedup stage, ``RUN/dedup``: the group report, the keep-list, the contact
sheet and the summary (written last: it records the other files' sizes and digests, and
the embed shards the grouping covered, so a keep-list of older shards is never applied to
newer rows).

    RUN/dedup/groups.parquet   group, row, id, representative, similarity, split
    RUN/dedup/keep.parquet     row, id of every image row kept (one per group + the rest)
    RUN/dedup/sheet.png        the largest groups, by eye
    RUN/dedup/summary.json     counts, config, signals used, file records, shards covered
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from ..errors import FormatError, MissingError, UserError
from . import seal
from .files import (
    atomic_write_bytes,
    atomic_write_json,
    file_record,
    make_dirs,
    no_links,
    read_bytes,
    read_json,
)

REMEDY = "rerun `python -m pipeline dedup`"
FILES = {"groups": "groups.parquet", "keep": "keep.parquet", "sheet": "sheet.png"}


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_page_checksum=True)
    return buf.getvalue()


class DedupFiles:
    """``RUN/dedup``: written atomically, read never through a link (an untrusted run)."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.dir = run / "dedup"
        self.summary_path = self.dir / "summary.json"

    def path(self, role: str) -> Path:
        return no_links(self.run, self.dir / FILES[role])

    def write(self, groups: pa.Table, keep: pa.Table, sheet: bytes,
              summary: dict[str, Any]) -> dict[str, Any]:
        """Write the report, keep-list and sheet, then the summary recording them (last)."""
        make_dirs(self.run, self.dir)
        records = {}
        for role, data in (("groups", parquet_bytes(groups)), ("keep", parquet_bytes(keep)),
                           ("sheet", sheet)):
            atomic_write_bytes(self.path(role), data)
            records[role] = file_record(self.path(role), FILES[role])
        summary = {**summary, "files": records}
        atomic_write_json(no_links(self.run, self.summary_path), seal.seal(summary))
        return summary

    def summary(self) -> dict[str, Any] | None:
        """The last dedup run's summary, None when the stage never ran."""
        path = no_links(self.run, self.summary_path)
        if not os.path.lexists(path):
            return None
        d = read_json(path, "dedup summary", REMEDY)
        seal.check(d, path, "dedup summary", REMEDY)  # an edited summary is refused
        if not isinstance(d.get("files"), dict) or not isinstance(d.get("shards"), list):
            raise FormatError(f"dedup summary {self.summary_path} is incomplete: {REMEDY}")
        return {k: v for k, v in d.items() if k != seal.FIELD}

    def verify(self) -> list[str]:
        """Every problem of the dedup files (none when the stage never ran)."""
        try:
            if self.summary() is None:
                return []
            problems = []
            for role in FILES:
                try:
                    self._checked_bytes(role)
                except UserError as e:
                    problems.append(str(e))
            return problems
        except UserError as e:
            return [str(e)]

    def read(self, role: str, columns: list[str] | None = None,
             verify: bool = True) -> pa.Table:
        """The groups report or the keep-list, checked against the summary's record."""
        d = self.summary()
        if d is None:
            raise MissingError(f"no dedup report in {self.dir.parent}: run `python -m "
                               "pipeline dedup` first")
        data = self._checked_bytes(role, d, verify)
        path = self.path(role)
        try:
            return pq.read_table(io.BytesIO(data), columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise FormatError(f"dedup {role} file {path} is corrupt ({e}): {REMEDY}") from None

    def _checked_bytes(self, role: str, summary: dict[str, Any] | None = None,
                       verify: bool = True) -> bytes:
        """A file's bytes (never through a link), checked against the summary's record."""
        d = summary if summary is not None else self.summary() or {"files": {}}
        path, record = self.path(role), d["files"].get(role) or {}
        try:
            data = read_bytes(path)
        except FileNotFoundError:
            raise FormatError(f"dedup {role} file {path} is missing: {REMEDY}") from None
        if len(data) != record.get("bytes") or (
                verify and xxhash.xxh3_128_hexdigest(data) != record.get("digest")):
            raise FormatError(f"dedup {role} file {path} is corrupt (its size or checksum "
                              f"does not match the summary's): {REMEDY}")
        return data

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A scratch folder (a column spilled for the per-cluster pass), removed afterwards,
        with any a killed run left (the caller holds the dedup lock)."""
        make_dirs(self.run, self.dir)
        for old in self.dir.glob(".scratch-*"):
            shutil.rmtree(old, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(dir=self.dir, prefix=".scratch-"))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def keep_rows(self, verify: bool = True) -> np.ndarray:
        """Sorted image rows of the keep-list."""
        rows = self.read("keep", ["row"], verify).column(0).to_numpy()
        return np.sort(rows.astype(np.int64))
