"""Files of the stages downstream of the index: heads, predictions, evaluation, serving.

A saved head is one unit: ``NAME.<token>.safetensors`` holds the weights, ``NAME.json``
(written last, sealed: :mod:`.seal`) describes the head and records the weights file's
name, size and digest.  A rerun writes new weights under a new name before replacing the
description, so there is no moment where a description meets weights it does not
describe; weights no description names (a killed run's) are removed when the heads stage
next takes its lock.  A description edited by hand (two class names swapped) no longer
matches its digest and is refused.  The mechanics are those of every trained model
(:mod:`.trained`: heads, adapters, latent models).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import xxhash

from ..errors import FormatError
from . import seal
from .featcache import FeatureCache
from .files import (
    atomic_write_bytes,
    atomic_write_json,
    check_name,
    make_dirs,
    no_links,
    read_bytes,
    read_json,
)
from .trained import HEAD, descriptions, leftovers, load_model_files, save_model_files


class HeadsFiles:
    def __init__(self, run: Path) -> None:
        self.run = run
        self.dir = run / "heads"
        self.models = self.dir / "models"
        self.cache = FeatureCache(run, self.dir / "cache")  # features too large for memory

    def model_json(self, stem: str) -> Path:
        path = self.models / f"{check_name(stem, 'head name')}.json"
        make_dirs(self.run, self.models)
        return no_links(self.run, path)

    def output(self, name: str) -> Path:
        """A report file of the stage (comparison.csv/.json/.png, confusion.png)."""
        make_dirs(self.run, self.dir)
        return no_links(self.run, self.dir / check_name(name, "output"))

    def splits_path(self) -> Path:
        make_dirs(self.run, self.dir)
        return no_links(self.run, self.dir / "splits.json")

    def read_splits(self) -> dict[str, Any] | None:
        path = no_links(self.run, self.dir / "splits.json")
        if not os.path.lexists(path):
            return None
        remedy = f"delete {path} to make the splits again"
        record = read_json(path, "split record", remedy)
        seal.check(record, path, "split record", remedy)  # an edited split is refused
        return record

    def write_splits(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.splits_path(), seal.seal(record))

    def prediction(self, stem: str) -> Path:
        return no_links(self.run, self.dir / "predictions"
                        / f"{check_name(stem, 'head name')}.parquet")

    def descriptions(self) -> list[Path]:
        return descriptions(self.run, self.models)

    def leftovers(self) -> list[Path]:
        """Weights files no head description names (a killed run's)."""
        return leftovers(self.run, self.models, HEAD)

    def clean(self) -> list[Path]:
        found = self.leftovers()
        for path in found:
            path.unlink(missing_ok=True)
        return found


def save_head_files(json_path: Path, weights: bytes, description: dict[str, Any]) -> Path:
    """Write a head's weights then its description (last); remove the weights it replaced."""
    return save_model_files(json_path, weights, description, HEAD)


def load_head_files(path: Path) -> tuple[dict[str, Any], bytes]:
    """A head's description and verified weight bytes; FormatError naming the bad file.
    The description's digest is checked (an edited one is refused), the weights' too."""
    return load_model_files(path, HEAD)


class EvalFiles:
    def __init__(self, run: Path) -> None:
        self.run = run
        self.dir = run / "eval"

    def write_report(self, name: str, report: dict[str, Any], markdown: str) -> Path:
        check_name(name, "report")
        make_dirs(self.run, self.dir)
        atomic_write_json(no_links(self.run, self.dir / f"{name}.json"), report)
        atomic_write_bytes(no_links(self.run, self.dir / f"{name}.md"), markdown.encode())
        return self.dir / f"{name}.json"

    def write_hybrid(self, record: dict[str, Any]) -> Path:
        """Save the tuned weights of hybrid retrieval (``RUN/eval/hybrid.json``, sealed:
        search trusts them only as written)."""
        make_dirs(self.run, self.dir)
        path = no_links(self.run, self.dir / "hybrid.json")
        atomic_write_json(path, seal.seal(record))
        return path

    def read_hybrid(self) -> dict[str, Any] | None:
        """The saved hybrid weights (None when none were tuned); an edited file is refused."""
        path = no_links(self.run, self.dir / "hybrid.json")
        if not os.path.lexists(path):
            return None
        remedy = "tune them again with `python -m pipeline eval-retrieval --hybrid`"
        record = read_json(path, "hybrid weights", remedy)
        seal.check(record, path, "hybrid weights", remedy)
        return record


class ServeFiles:
    """The server's own cache: thumbnails named by their key and their content's digest
    (``thumbs/<ab>/<key>.<digest>.jpg``), so a cached file that was altered is never
    served; copies of remote tar shards (``cache/``); upload scratch files."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.dir = run / "serve"

    def thumbnail(self, key: str) -> bytes | None:
        """The cached thumbnail of ``key`` if one is there and sound (others are removed)."""
        folder = no_links(self.run, self.dir / "thumbs" / check_name(key, "thumbnail key")[:2])
        if not folder.is_dir():
            return None
        with os.scandir(folder) as it:
            found = [e.name for e in it if e.name.startswith(key + ".")
                     and e.name.endswith(".jpg")]
        for name in found:
            path = folder / name
            try:
                data = read_bytes(path)
            except (OSError, FormatError):
                data = None
            if data is not None and name == _thumb_name(key, data):
                return data
            path.unlink(missing_ok=True)  # altered, or a link: never served
        return None

    def save_thumbnail(self, key: str, data: bytes) -> None:
        folder = make_dirs(self.run, self.dir / "thumbs" / check_name(key, "thumbnail key")[:2])
        atomic_write_bytes(no_links(self.run, folder / _thumb_name(key, data)), data)

    def scratch(self) -> Path:
        return no_links(self.run, self.dir / "tmp")

    def source_cache(self) -> Path:
        """The folder of copies of remote tar shards the page's thumbnails were read from
        (bounded, checked by :mod:`embeddings.sources.shard_cache`); no link on the way."""
        return no_links(self.run, self.dir / "cache")


def _thumb_name(key: str, data: bytes) -> str:
    return f"{key}.{xxhash.xxh3_64_hexdigest(data)}.jpg"
