"""Files of trained models: heads (``RUN/heads/models``), adapters (``RUN/align``) and
latent models (``RUN/latent``), all kept the same way.

A saved model is one unit: ``NAME.<token>.safetensors`` holds the weights and
``NAME.json`` (written last, sealed: :mod:`.seal`) describes the model and records the
weights file's name, size and digest.  A retrain writes new weights under a new name
before it replaces the description, so there is no moment where a description meets
weights it does not describe; weights no description names (a killed run's) are removed
when the stage next takes its lock.  A description edited by hand no longer matches its
digest and is refused; nothing is followed through a link.  The description also carries
the columns the model was trained on with their provenance, so it is refused on vectors
of other models (:func:`embeddings.store.check_same_model`).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FormatError, MissingError
from . import seal
from .files import (
    atomic_write_bytes,
    atomic_write_json,
    check_file,
    check_name,
    confined,
    file_record,
    make_dirs,
    no_links,
    read_bytes,
    read_json,
    tampered,
)

WEIGHTS_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class ModelFormat:
    """What a saved model says it is, and how to remake it when it is bad."""

    name: str  # "embeddings.adapter"
    version: int
    what: str  # "adapter", for messages
    remedy: str


HEAD = ModelFormat("embeddings.head", 2, "head", "retrain it with `python -m pipeline heads`")
ADAPTER = ModelFormat("embeddings.adapter", 1, "adapter",
                      "retrain it with `python -m pipeline align`")
LATENT = ModelFormat("embeddings.latent", 1, "latent model",
                     "retrain it with `python -m pipeline latent`")


class TrainedFiles:
    """Saved models of one stage folder (``RUN/align`` or ``RUN/latent``)."""

    def __init__(self, run: Path, stage: str, fmt: ModelFormat) -> None:
        self.run = run
        self.dir = run / stage
        self.fmt = fmt

    def path(self, name: str) -> Path:
        """Where the model ``name`` is described (``RUN/<stage>/NAME.json``)."""
        return no_links(self.run, self.dir / f"{check_name(name, self.fmt.what + ' name')}.json")

    def writable(self, name: str) -> Path:
        """:meth:`path`, with the stage folder made (no link on the way) to save into."""
        make_dirs(self.run, self.dir)
        return self.path(name)

    def save(self, name: str, weights: bytes, description: dict[str, Any]) -> Path:
        return save_model_files(self.writable(name), weights, description, self.fmt)

    def load(self, name: str) -> tuple[dict[str, Any], bytes]:
        return load_model_files(self.path(name), self.fmt)

    def descriptions(self) -> list[Path]:
        return descriptions(self.run, self.dir)

    def names(self) -> list[str]:
        """Saved models of this stage, by name."""
        return [p.stem for p in self.descriptions()]

    def leftovers(self) -> list[Path]:
        return leftovers(self.run, self.dir, self.fmt)

    def clean(self) -> list[Path]:
        found = self.leftovers()
        for path in found:
            path.unlink(missing_ok=True)
        return found


def descriptions(run: Path, folder: Path) -> list[Path]:
    """The ``*.json`` descriptions in ``folder`` (no link on the way or among them)."""
    folder = no_links(run, folder)
    if not folder.is_dir():
        return []
    with os.scandir(folder) as it:
        found = [folder / e.name for e in it if e.name.endswith(".json")
                 and not e.name.startswith(".")]
    for path in found:
        no_links(run, path)
    return sorted(found)


def leftovers(run: Path, folder: Path, fmt: ModelFormat) -> list[Path]:
    """Weights files no description names (a killed run's); a weights file whose
    description cannot be read is kept (it may be that model's)."""
    folder = no_links(run, folder)
    if not folder.is_dir():
        return []
    named, unreadable = set(), set()
    for desc in descriptions(run, folder):
        try:
            named.add(read_json(desc, fmt.what, fmt.remedy)["weights"]["file"])
        except (FormatError, KeyError, TypeError):
            unreadable.add(desc.stem)
    with os.scandir(folder) as it:
        weights = [e.name for e in it if e.name.endswith(WEIGHTS_SUFFIX)
                   and not e.name.startswith(".") and e.is_file(follow_symlinks=False)]
    return sorted(folder / w for w in weights
                  if w not in named and w.rsplit(".", 2)[0] not in unreadable)


def save_model_files(json_path: Path, weights: bytes, description: dict[str, Any],
                     fmt: ModelFormat) -> Path:
    """Write the weights then the sealed description (last); remove the weights it replaced."""
    old = _old_weights(json_path, fmt)
    name = f"{json_path.stem}.{secrets.token_hex(4)}{WEIGHTS_SUFFIX}"
    wpath = json_path.with_name(name)
    if os.path.islink(json_path.parent):
        raise tampered(json_path.parent)
    atomic_write_bytes(wpath, weights)
    meta = {"format": fmt.name, "version": fmt.version, **description,
            "weights": file_record(wpath, name)}
    atomic_write_json(json_path, seal.seal(meta))
    if old and old != name:
        try:
            confined(json_path.parent, old, f"{fmt.what} weights").unlink(missing_ok=True)
        except FormatError:
            pass  # a tampered old record: never delete what it names
    return json_path


def _old_weights(json_path: Path, fmt: ModelFormat) -> str | None:
    try:
        return read_json(json_path, fmt.what, fmt.remedy)["weights"]["file"]
    except (FormatError, KeyError, TypeError):
        return None


def load_model_files(path: Path, fmt: ModelFormat) -> tuple[dict[str, Any], bytes]:
    """A model's description and verified weight bytes; FormatError naming the bad file.
    The description's digest is checked (an edited one is refused), the weights' too;
    ``meta["sealed"]``: whether this machine wrote it."""
    path = Path(path).with_suffix(".json")
    if os.path.islink(path):
        raise tampered(path)
    if not path.is_file():
        raise MissingError(f"no saved {fmt.what} at {path}")
    meta = read_json(path, f"{fmt.what} description", fmt.remedy)
    if meta.get("format") != fmt.name or meta.get("version") != fmt.version:
        raise FormatError(f"{path} is not a saved {fmt.what} of format {fmt.name} "
                          f"v{fmt.version}: {fmt.remedy}")
    sealed = seal.check(meta, path, f"{fmt.what} description", fmt.remedy)
    record = meta.get("weights")
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        raise FormatError(f"{fmt.what} description {path} is corrupt (no weights record): "
                          f"{fmt.remedy}")
    wpath = confined(path.parent, record["file"], f"{fmt.what} weights", source=path,
                     remedy=fmt.remedy)
    check_file(wpath, record, f"{fmt.what} weights", fmt.remedy)
    meta = {k: v for k, v in meta.items() if k != seal.FIELD}
    meta["sealed"] = sealed
    return meta, read_bytes(wpath)
