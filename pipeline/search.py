"""Search a run's indexes with a text or an image; hits map back to shard rows.

The query is embedded by the encoder that made the indexed column, loaded through
:func:`embeddings.encoders.encoder_for_column`, which refuses a model that differs from
the recorded one.  Index row ``i`` is row ``i`` of the column's shards (checked by
:func:`pipeline.index.open_index`), so no separate id mapping exists: a hit's metadata is
read from only the shards that hold its row (the store's row-to-shard offsets), never
from a table of every row, and filters come from the bitmaps cached beside the index.

    >>> s = Searcher("runs/demo", "clip_image")
    >>> s.search_text("a red bicycle", k=5).hits[0].image
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embeddings import index as ix
from embeddings.encoders import Encoder, encoder_for_column, resolve_device
from embeddings.errors import FormatError, InputError, MissingError
from embeddings.images import ImageError, load_image
from embeddings.store import Run, column_name

from .index import allowed_rows, open_index
from .leaks import kept_mask

log = logging.getLogger(__name__)
MODALITIES = ("image", "text")
IMAGE_META = ["id", "image", "label", "split", "captions"]
CAPTION_META = ["id", "caption", "image_id", "label", "split", "image"]  # image: hit tables
FILTERS_KEPT = 32  # filter bitmaps a searcher keeps in memory (n / 8 bytes each)


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    row: int  # row of the column's shards (= index id)
    id: str
    caption: str | None
    image: str | None  # path relative to the dataset root
    label: str | None
    split: str | None
    image_id: str | None = None  # caption hits: the image the caption belongs to
    duplicates: list[str] | None = None  # serve: ids of the image's duplicates (RUN/dedup)


@dataclass
class SearchResult:
    column: str
    query: str
    k: int
    hits: list[Hit]
    notes: list[str] = field(default_factory=list)
    via: str | None = None  # the adapter the text query went through (search --via)
    hybrid: dict[str, float] | None = None  # search --hybrid: each source's weight

    def to_dict(self) -> dict[str, Any]:
        return {"column": self.column, "query": self.query, "k": self.k, "via": self.via,
                "hybrid": self.hybrid, "notes": self.notes,
                "hits": [asdict(h) for h in self.hits]}


def pick_column(run: str | Path, modality: str = "image", query: str = "text",
                column: str | None = None) -> str:
    """The column to search for a ``query``-modality query returning ``modality`` rows.

    Only encoders that embed both modalities qualify; for text->text a text-only model
    (sentence-transformers) is preferred to a CLIP text tower.  ``query="id"`` (a stored
    row's vector) needs no encoder: any column of ``modality``, or a latent column.
    """
    manifest = Run(run).embed.manifest()
    columns = manifest.columns
    if column is not None:
        col = manifest.column(column)
        if query == "id":
            return column
        if col.modality not in MODALITIES:  # a derived column: no model embeds queries
            made = (col.provenance.preprocess or {}).get("inputs") or {}
            raise InputError(f"column {column} is a {col.modality} column (learned over "
                             f"{' + '.join(made) or 'other columns'}): no encoder embeds a "
                             f"{query} query into it; search it by a stored row: --id ID")
        if column_name(col.encoder, query) not in columns:
            raise InputError(f"column {column} was made by {col.encoder}, which cannot "
                             f"embed {query} queries; choose another --column of "
                             f"{sorted(columns)}")
        return column
    if modality not in MODALITIES:
        raise InputError(f"--modality must be one of {MODALITIES}, not {modality!r}")
    found = [c for c, col in columns.items()
             if col.modality == modality and (query == "id" or column_name(col.encoder, query)
                                              in columns)]
    if not found:
        raise InputError(f"no embedding column of this run answers {query}->{modality} "
                         f"queries; it has {sorted(columns)}")
    if modality == query == "text":
        found.sort(key=lambda c: column_name(columns[c].encoder, "image") in columns)
    return found[0]


class Searcher:
    """One column's index, point reads of its rows and (on the first query) its encoder."""

    def __init__(self, run: str | Path, column: str, device: str = "auto",
                 mmap: bool = True, verify: bool = True) -> None:
        self.run, self.column = Path(run), column
        self.device = device
        self.index, self.entry = open_index(run, column, mmap=mmap, device=device,
                                            verify=verify)
        self.files = Run(run)
        self.info = self.files.embed.manifest().column(column)
        self.kind = self.info.kind
        self.reader = self.files.embed.reader(self.kind)
        if self.reader.offsets.total != self.index.ntotal:
            raise FormatError(f"{self.kind} shards hold {self.reader.offsets.total} rows, "
                              f"the index {self.index.ntotal}: rerun the index stage")
        # `index --dedup`: only the keep-list's rows are searched (checked fresh here)
        self.kept = kept_mask(self.files, self.reader.offsets.total) \
            if self.entry.stats.get("dedup") else None
        self._encoder: Encoder | None = None
        self._filters: OrderedDict[tuple[str | None, str | None], Any] = OrderedDict()
        self._images: Any = None  # the image rows' reader (caption hits' image paths)
        self._lock = threading.Lock()

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = encoder_for_column(self.info, resolve_device(self.device))
        return self._encoder

    def embed_text(self, text: str) -> np.ndarray:
        if not text or not text.strip():
            raise InputError("empty query: give some text, or --image PATH")
        return self.encoder.encode_texts([text.strip()])

    def embed_image(self, path: str | Path) -> np.ndarray:
        try:
            image = load_image(path)
        except ImageError as e:
            raise InputError(f"cannot use query image {path}: {e}") from None
        enc = self.encoder
        if "image" not in enc.modalities or enc.image_transform is None:
            raise InputError(f"{self.info.provenance.model} cannot embed images")
        return enc.encode_images(enc.image_transform(image).unsqueeze(0))

    def search_text(self, text: str, k: int = 10, split: str | None = None,
                    label: str | None = None) -> SearchResult:
        return self.search_vector(self.embed_text(text), text.strip(), k, split, label)

    def search_image(self, path: str | Path, k: int = 10, split: str | None = None,
                     label: str | None = None) -> SearchResult:
        return self.search_vector(self.embed_image(path), f"image:{path}", k, split, label)

    def search_id(self, row_id: str, k: int = 10, split: str | None = None,
                  label: str | None = None) -> SearchResult:
        """"More like this": the column's stored vector of row ``row_id`` is the query
        (no encoder: the one query a latent column answers)."""
        row = self.reader.find_ids([row_id]).get(row_id)
        if row is None:
            what = "image" if self.kind == "images" else "caption"
            raise MissingError(f"no {what} row with id {row_id[:200]!r} in {self.run} "
                               f"(column {self.column})")
        vector = self.reader.read_vectors(self.column, self.info.dim, [row])
        return self.search_vector(vector.astype(np.float32), f"like:{row_id}", k, split, label)

    def allowed(self, split: str | None, label: str | None) -> Any:
        """The rows a split / label filter keeps (the bitmap cached beside the index, then
        kept here for the next queries: a bounded cache), None for no filter."""
        if split is None and label is None and self.kept is None:
            return None
        key = (split, label)
        with self._lock:
            got = self._filters.get(key)
            if got is not None:
                self._filters.move_to_end(key)
                return got
        mask = allowed_rows(self.run, self.kind, split, label)
        if self.kept is not None:
            mask = self.kept if mask is None else mask & self.kept
        got = ix.Allowed.of(mask)
        if self.kept is None and mask is not None:
            self._locate(got, split, label)
        with self._lock:
            self._filters[key] = got
            while len(self._filters) > FILTERS_KEPT:
                self._filters.popitem(last=False)
        return got

    def _locate(self, got: Any, split: str | None, label: str | None) -> None:
        """Where a filter's rows sit in the lists (few rows: their entries, and their codes
        when few; many: how many each list holds), cached beside the index (keyed by the
        index files' digests), so a search neither rescans the lists' ids nor reads a page
        of the lists file per row."""
        key, filters = self.entry.files_key, self.files.filters
        cached = filters.entries(self.kind, split, label, key)
        usable = cached is not None and got.use_placement(self.index, cached)
        packed = got.packed_placement(self.index)  # with the rows' codes when they are few
        if packed is not None and (not usable or len(packed) != len(cached or b"")):
            filters.keep_entries(self.kind, split, label, key, packed)

    def search_vector(self, vector: np.ndarray, query: str, k: int = 10,
                      split: str | None = None, label: str | None = None) -> SearchResult:
        """Top-``k`` rows for one query vector, optionally only rows of a split / label."""
        if k < 1:
            raise InputError(f"--k must be >= 1, got {k}")
        notes = []
        n = int(self.index.ntotal)
        if k > n:
            notes.append(f"k={k} is more than the {n} vectors in the index: returning {n}")
            k = n
        allowed = self.allowed(split, label)
        scores, ids = ix.search_filtered(self.index, np.atleast_2d(vector), k, allowed)
        keep = ids[0] >= 0
        if allowed is not None and keep.sum() < k:
            what = " and ".join(f"{a}={v!r}" for a, v in (("split", split), ("label", label))
                                if v is not None) or "the dedup keep-list"
            notes.append(f"only {int(keep.sum())} hit(s) with {what}"
                         f" ({allowed.count} rows match)")
        for note in notes:
            log.warning("%s", note)
        return SearchResult(self.column, query, k, self.hits(scores[0][keep], ids[0][keep]),
                            notes)

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[Hit]:
        """Hits for index rows, their metadata read from the shards that hold them."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.kind == "images":
            t = self.reader.read_rows(rows, IMAGE_META).to_pydict()
            return [Hit(r + 1, float(s), int(row), t["id"][r],
                        (t["captions"][r] or [None])[0], t["image"][r], t["label"][r],
                        t["split"][r]) for r, (s, row) in enumerate(zip(scores, rows))]
        t = self.reader.read_rows(rows, CAPTION_META).to_pydict()
        unknown = [r for r, path in enumerate(t["image"]) if path is None]
        paths = self.image_paths(rows[unknown], [t["image_id"][r] for r in unknown]) \
            if unknown else {}
        return [Hit(r + 1, float(s), int(row), t["id"][r], t["caption"][r],
                    t["image"][r] or paths.get(t["image_id"][r]), t["label"][r],
                    t["split"][r], t["image_id"][r])
                for r, (s, row) in enumerate(zip(scores, rows))]

    def image_paths(self, caption_rows: np.ndarray, image_ids: list[str]) -> dict[str, str]:
        """Image path of each caption's image, looked up in the image shard of the same
        embed block (captions and their images are written together), else everywhere."""
        if self._images is None:
            self._images = self.files.embed.reader("images")
        images = self._images
        block_of = {r.block: i for i, r in enumerate(images.records)}
        shards = {block_of.get(self.reader.records[s].block)
                  for s in self.reader.offsets.shard_of(caption_rows)}
        found = images.find_ids(image_ids, shards=sorted(s for s in shards if s is not None))
        if len(found) < len(set(image_ids)):
            found.update(images.find_ids([i for i in image_ids if i not in found]))
        if not found:
            return {}
        table = images.read_rows(list(found.values()), ["id", "image"]).to_pydict()
        return dict(zip(table["id"], table["image"]))


def search(run: str | Path, text: str | None = None, image: str | Path | None = None,
           modality: str = "image", column: str | None = None, k: int = 10,
           split: str | None = None, label: str | None = None, device: str = "auto",
           mmap: bool = True, verify: bool = True, via: str | None = None,
           row_id: str | None = None) -> SearchResult:
    """One query (``text``, ``image`` or a stored row's ``row_id``) against the run's index
    of the chosen column; with ``via``, a text query through that adapter (:mod:`.via`)."""
    if sum(q is not None for q in (text, image, row_id)) != 1:
        raise InputError("give exactly one query: text, an image (--image PATH) or a row "
                         "(--id ID)")
    if row_id is not None:
        if via is not None:
            raise InputError("--via maps text queries: give a query text, or drop --via")
        col = pick_column(run, modality, "id", column)
        return Searcher(run, col, device=device, mmap=mmap, verify=verify).search_id(
            row_id, k, split, label)
    if text is not None and not text.strip():
        raise InputError("empty query: give some text, or --image PATH")
    if via is not None:
        from .via import open_via

        if image is not None:
            raise InputError("--via maps text queries: give a query text, or drop --via")
        v = open_via(run, via, device)
        col = v.column(Run(run).embed.manifest().columns, modality, column)
        return v.query((text or "").strip(), Searcher(run, col, device=device, mmap=mmap,
                                                      verify=verify), k, split, label)
    if image is not None and not Path(image).is_file():
        raise InputError(f"cannot use query image {image}: no such file")
    col = pick_column(run, modality, "image" if image is not None else "text", column)
    searcher = Searcher(run, col, device=device, mmap=mmap, verify=verify)
    if image is not None:
        return searcher.search_image(image, k, split, label)
    return searcher.search_text(text or "", k, split, label)


def format_table(result: SearchResult, width: int = 48) -> str:
    """A plain-text table of the hits: rank, score, id, caption, image path, label."""
    head = ("rank", "score", "id", "caption", "image", "label")
    rows = [(str(h.rank), f"{h.score:.4f}", h.id, _cut(h.caption, width), h.image or "",
             h.label or "") for h in result.hits]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    via = f" via {result.via}" if result.via else ""
    if result.hybrid:
        via = " hybrid " + " + ".join(f"{w:g} {n}" for n, w in result.hybrid.items())
    lines = [f"{result.column}{via}: {result.query!r} ({len(result.hits)} hits)"]
    for r in [head, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _cut(text: str | None, width: int) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"
