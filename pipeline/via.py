"""Queries through an adapter (``search --via``, ``eval-retrieval --via``, the page's "via"):
the query is embedded by the adapter's *source* encoder, mapped into the *target*
column's space, and searched in an index of that space.

The adapter is loaded through the store (sealed, digest-checked) and bound to the run:
its target column must be in the run, made by the same model (else RunMismatch), and its
source encoder is the run's own source column's when the run has one (same model
checked), otherwise the one the adapter recorded, loaded only under the rules of
:func:`embeddings.encoders.check_trusted` (a local model is loaded only if this machine
sealed the adapter or the user's config names it).

The searched column is the target itself, or, when the target is one tower of a model
with two (CLIP: ``clip_text``), that model's column of the asked modality
(``clip_image``): both towers share one space.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from embeddings.align import Adapter, adapter_summary, check_adapter_columns, load_run_adapter
from embeddings.encoders import Encoder, encoder_for_column, resolve_device
from embeddings.errors import InputError, MissingError, UserError
from embeddings.store import Column, Run, check_same_model, column_name


@dataclass
class Via:
    """An adapter bound to a run: what to embed queries with and where they land."""

    name: str
    adapter: Adapter
    source: Column  # the column whose encoder embeds the query
    target: Column
    device: str = "cpu"
    _encoder: Encoder | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def encoder(self) -> Encoder:
        with self._lock:
            if self._encoder is None:
                self._encoder = encoder_for_column(self.source, resolve_device(self.device))
            return self._encoder

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit rows of the target space for ``texts``."""
        return self.map(self.encoder.encode_texts(list(texts)))

    def map(self, source_vectors: np.ndarray) -> np.ndarray:
        return self.adapter.apply(np.asarray(source_vectors, np.float32))

    def column(self, columns: Mapping[str, Column], modality: str | None = None,
               column: str | None = None) -> str:
        """The column to search: ``column`` if given (it must share the target's space),
        else the target model's column of ``modality``, else the target."""
        t = self.target
        space = {c for c, info in columns.items() if info.encoder == t.encoder}
        if column is not None:
            if column not in space:
                raise InputError(f"--column {column} is not in the space adapter {self.name} "
                                 f"maps into ({t.encoder}: {sorted(space) or [t.name]})")
            return column
        if modality is not None and column_name(t.encoder, modality) in columns:
            return column_name(t.encoder, modality)
        return t.name

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, **adapter_summary(self.adapter)}

    def query(self, text: str, searcher: Any, k: int, split: str | None, label: str | None,
              lock: AbstractContextManager[Any] | None = None) -> Any:
        """``text`` through the adapter, searched with ``searcher`` (a
        :class:`pipeline.search.Searcher` of :meth:`column`), under ``lock`` while it
        encodes; the result names the adapter."""
        with lock or nullcontext():
            vector = self.encode_texts([text])
        result = searcher.search_vector(vector, text, k, split, label)
        result.via = self.name
        return result


class Vias:
    """A server's adapters: each bound once (its encoder loads on first use); only names
    of ``RUN/align`` are accepted, never a path from a request."""

    def __init__(self, run: str | Path, device: str, columns: Mapping[str, Column]) -> None:
        self.run, self.device, self.columns = run, device, columns
        self._bound: dict[str, Via] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Via:
        with self._lock:
            if name not in self._bound:
                if name not in Run(self.run).align.names():
                    raise MissingError(f"no adapter {name[:200]!r} in this run")
                self._bound[name] = open_via(self.run, name, self.device, self.columns)
            return self._bound[name]

    def search(self, service: Any, name: str, text: str, modality: str, column: str | None,
               k: int, split: str | None, label: str | None) -> Any:
        """``service``'s (:class:`pipeline.serve.Service`) text search through adapter
        ``name``: its searcher of the adapter's space, one encode at a time."""
        v = self.get(name)
        searcher = service.searcher(v.column(self.columns, modality, column))
        return service._remember(v.query(text, searcher, k, split, label,
                                         service._encode_lock))

    def listing(self) -> dict[str, dict[str, Any]]:
        return adapters(self.run)


def open_via(run: str | Path, name: str, device: str = "cpu",
             columns: Mapping[str, Column] | None = None) -> Via:
    """The adapter ``name`` (``RUN/align/NAME.json``, or a path to one) bound to ``run``."""
    if not name or not name.strip():
        raise InputError("--via needs an adapter name: one of RUN/align/*.json "
                         "(python -m pipeline align trains one)")
    files = Run(run)
    if columns is None:
        columns = files.embed.manifest().columns
    known = files.align.names()
    if "/" not in name and not name.endswith(".json") and name not in known:
        raise InputError(f"no adapter {name!r} in {files.align.dir}: "
                         + (f"choose one of {known}" if known else
                            "train one with `python -m pipeline align`"))
    adapter = load_run_adapter(run, name)
    check_adapter_columns(adapter, columns, f"run {run}", sides=("target",))
    assert adapter.source is not None and adapter.target is not None
    source = adapter.source
    if source.name in columns:
        check_same_model(source.provenance, columns[source.name].provenance,
                         f"column {source.name!r} of run {run}",
                         "use an adapter trained on this run's columns, or retrain it with "
                         "`python -m pipeline align`")
        source = columns[source.name]
    else:
        source = replace(source, trusted=adapter.sealed)
    return Via(Path(name).stem, adapter, source, columns[adapter.target.name], device)


def adapters(run: str | Path) -> dict[str, dict[str, Any]]:
    """Every saved adapter of ``run`` that loads, by name, with what it maps (for the page);
    a bad one is left out with its problem."""
    files = Run(run)
    out: dict[str, dict[str, Any]] = {}
    for name in files.align.names():
        try:
            via = open_via(run, name)
            out[name] = via.summary()
        except UserError as e:  # a bad or foreign adapter: listed, never fatal
            out[name] = {"name": name, "problem": str(e)}
    return out
