"""img2dataset's sidecar parquet (``00000.parquet`` beside ``00000.tar``): the accounting.

img2dataset writes one row per sample it tried, with ``status`` (``success``,
``failed_to_download``, ``failed_to_resize``) and ``error_message``.  A ``success`` row
promises a sample in the tar; the rule here is that every one of them ends up either
embedded or listed in ``rejects.jsonl`` with a reason (``missing from the tar`` when the
tar lacks it), and a tar sample the sidecar does not call a success is rejected
(``sidecar disagrees with the tar``).  Failed rows are counted by their error message.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..sources import redact

TOP_ERRORS = 20  # distinct error messages kept per shard and in the totals


@dataclass(frozen=True)
class Sidecar:
    success: frozenset[str]  # keys whose status is success
    status: Mapping[str, str]  # every other key -> its status
    failed: Mapping[str, int]  # error message -> failed rows
    disagree: int = 0  # tar samples rejected because the sidecar does not call them a success

    def disagreement(self, key: str) -> str | None:
        """Why a tar sample with this key must not be embedded, or None."""
        if key in self.success:
            return None
        status = self.status.get(key)
        return (f"sidecar disagrees with the tar: the sidecar says {status!r}" if status
                else "sidecar disagrees with the tar: the key is not in the sidecar")


def parse(data: bytes) -> Sidecar:
    """A sidecar's bytes; ValueError naming what is wrong when they are not one."""
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"not a Parquet file ({e})") from None
    missing = {"key", "status"} - set(table.column_names)
    if missing:
        raise ValueError(f"no {' or '.join(sorted(missing))} column")
    keys = [str(k) for k in table.column("key").to_pylist()]
    status = [str(s) for s in table.column("status").to_pylist()]
    errors = table.column("error_message").to_pylist() if "error_message" in \
        table.column_names else [None] * len(keys)
    success = frozenset(k for k, s in zip(keys, status) if s == "success")
    others = {k: s for k, s in zip(keys, status) if s != "success"}
    failed = Counter(_message(e) for s, e in zip(status, errors) if s != "success")
    return Sidecar(success, others, dict(failed.most_common()))


def _message(error: Any) -> str:
    text = " ".join(str(error).split()) if error else "(no message)"
    return redact(text)[:160]


def account(sidecar: Sidecar, kept_ids: Iterable[str], image_rejects: Iterable[str]
            ) -> dict[str, Any]:
    """One block's reconciliation: of the sidecar's success rows, how many were embedded
    and how many rejected (the two must add up); failed rows by error message."""
    kept = {k for k in kept_ids if k in sidecar.success}
    embedded = len(kept)
    rejected = len({k for k in image_rejects if k in sidecar.success} - kept)
    top = Counter(sidecar.failed).most_common(TOP_ERRORS)
    failed = sum(sidecar.failed.values())
    errors = dict(top)
    if failed > sum(errors.values()):
        errors["(other messages)"] = failed - sum(errors.values())
    return {"success": len(sidecar.success), "embedded": embedded, "rejected": rejected,
            "failed": failed, "failed_by_error": errors, "disagree": sidecar.disagree}


def totals(records: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The blocks' reconciliations summed for the manifest (None: no sidecar anywhere)."""
    out: dict[str, Any] | None = None
    errors: Counter[str] = Counter()
    for r in records:
        if out is None:
            out = {"shards": 0, "success": 0, "embedded": 0, "rejected": 0, "failed": 0,
                   "disagree": 0}
        out["shards"] += 1
        for k in ("success", "embedded", "rejected", "failed", "disagree"):
            out[k] += int(r.get(k, 0))
        errors.update(r.get("failed_by_error", {}))
    if out is not None:
        out["failed_by_error"] = dict(errors.most_common(TOP_ERRORS))
        out["reconciled"] = out["embedded"] + out["rejected"] == out["success"]
    return out


def summary(t: Mapping[str, Any]) -> str:
    """One line: ``sidecar (4 shards): 60 success = 52 embedded + 8 rejected; ...``."""
    line = (f"sidecar ({t['shards']} shards): {t['success']} success = {t['embedded']} "
            f"embedded + {t['rejected']} rejected")
    if not t.get("reconciled", True):
        line += " (DOES NOT ADD UP: please report this)"
    if t["failed"]:
        top = ", ".join(f"{m}: {n}" for m, n in list(t["failed_by_error"].items())[:5])
        line += f"; {t['failed']} rows failed in img2dataset ({top})"
    if t["disagree"]:
        line += (f"; {t['disagree']} of those failed rows have a sample in the tar "
                 "(rejected: sidecar disagrees with the tar)")
    return line
