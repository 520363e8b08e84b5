"""Files of trained maps between spaces: adapters (``RUN/align``), latent models (``RUN/latent``).

Like a saved head, each is one unit: ``NAME.<token>.safetensors`` holds the weights and
``NAME.json`` (written last) describes the model and records the weights file's name,
size and digest; a retrain writes new weights under a new name before it replaces the
description, then removes the old weights.  The description also carries the columns
the model was trained on with their provenance, so it is refused on vectors of other
models (:func:`embeddings.store.check_same_model`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ModelFormat:
    """What a saved model says it is, and how to remake it when it is bad."""

    name: str  # "embeddings.adapter"
    version: int
    what: str  # "adapter", for messages
    remedy: str


ADAPTER = ModelFormat("embeddings.adapter", 1, "adapter",
                      "retrain it with `python -m pipeline align`")
LATENT = ModelFormat("embeddings.latent", 1, "latent model",
                     "retrain it with `python -m pipeline latent`")


class TrainedFiles:
    """Saved models of one stage folder (``RUN/align`` or ``RUN/latent``)."""

    def __init__(self, run: Path, stage: str, fmt: ModelFormat) -> None:
        self.dir = run / stage
        self.fmt = fmt

    def path(self, name: str) -> Path:
        """Where the model ``name`` is described (``RUN/<stage>/NAME.json``)."""
        return self.dir / f"{check_name(name, self.fmt.what + ' name')}.json"

    def names(self) -> list[str]:
        """Saved models of this stage, by name."""
        return sorted(p.stem for p in self.dir.glob("*.json")) if self.dir.is_dir() else []

    def save(self, name: str, weights: bytes, description: dict[str, Any]) -> Path:
        return save_model_files(self.path(name), weights, description, self.fmt)

    def load(self, name: str) -> tuple[dict[str, Any], bytes]:
        return load_model_files(self.path(name), self.fmt)

    def verify(self) -> list[str]:
        problems = []
        for name in self.names():
            try:
                self.load(name)
            except (FormatError, MissingError) as e:
                problems.append(str(e))
        return problems


def save_model_files(json_path: Path, weights: bytes, description: dict[str, Any],
                     fmt: ModelFormat) -> Path:
    """Write the weights then the description (last); remove the weights it replaced."""
    old = _old_weights(json_path, fmt)
    name = f"{json_path.stem}.{secrets.token_hex(4)}.safetensors"
    wpath = json_path.with_name(name)
    atomic_write_bytes(wpath, weights)
    meta = {"format": fmt.name, "version": fmt.version, **description,
            "weights": file_record(wpath, name)}
    atomic_write_json(json_path, meta)
    if old and old != name:
        confined(json_path.parent, old, f"{fmt.what} weights").unlink(missing_ok=True)
    return json_path


def _old_weights(json_path: Path, fmt: ModelFormat) -> str | None:
    if not json_path.exists():
        return None
    try:
        return read_json(json_path, fmt.what, fmt.remedy)["weights"]["file"]
    except (FormatError, KeyError, TypeError):
        return None


def load_model_files(path: Path, fmt: ModelFormat) -> tuple[dict[str, Any], bytes]:
    """A model's description and verified weight bytes; FormatError naming the bad file."""
    path = Path(path).with_suffix(".json")
    if not path.is_file():
        raise MissingError(f"no saved {fmt.what} at {path}")
    meta = read_json(path, f"{fmt.what} description", fmt.remedy)
    if meta.get("format") != fmt.name or meta.get("version") != fmt.version:
        raise FormatError(f"{path} is not a saved {fmt.what} of format {fmt.name} "
                          f"v{fmt.version}: {fmt.remedy}")
    record = meta.get("weights")
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        raise FormatError(f"{fmt.what} description {path} is corrupt (no weights record): "
                          f"{fmt.remedy}")
    wpath = confined(path.parent, record["file"], f"{fmt.what} weights")
    check_file(wpath, record, f"{fmt.what} weights", fmt.remedy)
    return meta, wpath.read_bytes()
