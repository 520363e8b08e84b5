"""What ``serve`` pays at start so the first queries do not: first-use imports and reads.

A query's path loads modules on first use (pyarrow's numpy conversions import pandas,
Arrow's compute functions load their own module: over a second together on a busy
machine) and opens files (a hit table is checked whole before it is mapped).  One
"more like this" query per indexed column at start pays the imports and the first reads;
then a background thread checks and maps every hit table of those columns' rows, so the
first lookup of an unseen id (a scan of every shard's table) does not check 200 files,
and parses every shard's footer, so the first vector read there does not.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from embeddings.errors import UserError

log = logging.getLogger(__name__)


def warm(service: Any) -> threading.Thread | None:
    """Run one query per indexed column now; check the hit tables in the background
    (the thread, or None when there is nothing to check)."""
    import pyarrow.compute  # noqa: F401  (loaded by Arrow's take and filters otherwise)

    readers = []
    for column in service.files.index.entries():
        if column in service.problems:
            continue
        try:
            searcher = service.searcher(column)
            reader = searcher.reader
            if not reader.offsets.total:
                continue
            vector = reader.read_vectors(column, searcher.info.dim, [0])  # imports pandas
            searcher.search_vector(vector.astype("float32"), "warm-up", k=1)
            reader.find_ids(reader.read_rows([0], ["id"]).column(0).to_pylist())
            readers.append(reader)
        except UserError as e:  # the query that meets it says so; start anyway
            log.warning("warm-up of %s: %s", column, e)
    if not readers:
        return None
    thread = threading.Thread(target=_check_tables, args=(readers,), daemon=True,
                              name="hit-tables")
    thread.start()
    return thread


def _check_tables(readers: list[Any]) -> None:
    for reader in readers:
        for shard in range(len(reader.records)):
            try:
                reader.hit_table(shard)
                reader.keep_footer(shard)  # the first "more like this" read there
            except UserError as e:
                log.warning("%s", e)
                break
