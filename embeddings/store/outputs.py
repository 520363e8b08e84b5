"""Files of the stages downstream of the index: heads, predictions, evaluation, serving.

A saved head is one unit: ``NAME.<token>.safetensors`` holds the weights, ``NAME.json``
(written last) describes the head and records the weights file's name, size and digest.
A rerun writes new weights under a new name before replacing the description, so there
is no moment where a description meets weights it does not describe.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from ..errors import FormatError, MissingError
from .files import (
    atomic_write_bytes,
    atomic_write_json,
    check_file,
    check_name,
    confined,
    file_record,
    read_json,
)

HEAD_FORMAT = "embeddings.head"
HEAD_VERSION = 2
HEAD_REMEDY = "retrain it with `python -m pipeline heads`"


class HeadsFiles:
    def __init__(self, run: Path) -> None:
        self.run = run
        self.dir = run / "heads"
        self.models = self.dir / "models"

    def model_json(self, stem: str) -> Path:
        return self.models / f"{check_name(stem, 'head name')}.json"

    def output(self, name: str) -> Path:
        """A report file of the stage (comparison.csv/.json/.png, confusion.png)."""
        return self.dir / check_name(name, "output")

    def splits_path(self) -> Path:
        return self.dir / "splits.json"

    def read_splits(self) -> dict[str, Any] | None:
        path = self.splits_path()
        if not path.exists():
            return None
        return read_json(path, "split record", f"delete {path} to make the splits again")

    def prediction(self, stem: str) -> Path:
        return self.dir / "predictions" / f"{check_name(stem, 'head name')}.parquet"


def save_head_files(json_path: Path, weights: bytes, description: dict[str, Any]) -> Path:
    """Write a head's weights then its description (last); remove the weights it replaced."""
    old = _old_weights(json_path)
    name = f"{json_path.stem}.{secrets.token_hex(4)}.safetensors"
    wpath = json_path.with_name(name)
    atomic_write_bytes(wpath, weights)
    meta = {"format": HEAD_FORMAT, "version": HEAD_VERSION, **description,
            "weights": file_record(wpath, name)}
    atomic_write_json(json_path, meta)
    if old and old != name:
        confined(json_path.parent, old, "head weights").unlink(missing_ok=True)
    return json_path


def _old_weights(json_path: Path) -> str | None:
    try:
        return read_json(json_path, "head", HEAD_REMEDY)["weights"]["file"]
    except (FormatError, KeyError, TypeError):
        return None


def load_head_files(path: Path) -> tuple[dict[str, Any], bytes]:
    """A head's description and verified weight bytes; FormatError naming the bad file."""
    path = path.with_suffix(".json")
    if not path.is_file():
        raise MissingError(f"no saved head at {path}")
    meta = read_json(path, "head description", HEAD_REMEDY)
    if meta.get("format") != HEAD_FORMAT or meta.get("version") != HEAD_VERSION:
        raise FormatError(f"{path} is not a saved head of format {HEAD_FORMAT} v{HEAD_VERSION}: "
                          f"{HEAD_REMEDY}")
    record = meta.get("weights")
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        raise FormatError(f"head description {path} is corrupt (no weights record): "
                          f"{HEAD_REMEDY}")
    wpath = confined(path.parent, record["file"], "head weights")
    check_file(wpath, record, "head weights", HEAD_REMEDY)
    return meta, wpath.read_bytes()


class EvalFiles:
    def __init__(self, run: Path) -> None:
        self.dir = run / "eval"

    def write_report(self, name: str, report: dict[str, Any], markdown: str) -> Path:
        check_name(name, "report")
        atomic_write_json(self.dir / f"{name}.json", report)
        atomic_write_bytes(self.dir / f"{name}.md", markdown.encode())
        return self.dir / f"{name}.json"


class ServeFiles:
    def __init__(self, run: Path) -> None:
        self.dir = run / "serve"

    def thumbnail(self, key: str) -> Path:
        return self.dir / "thumbs" / f"{check_name(key, 'thumbnail key')}.jpg"

    def scratch(self) -> Path:
        return self.dir / "tmp"

    def source_cache(self) -> Path:
        """Copies of remote tar shards the page's thumbnails were read from (bounded by
        the image source, least recently used first out)."""
        return self.dir / "cache"
