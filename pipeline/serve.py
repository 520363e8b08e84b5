"""What the search page and its JSON API serve: one run's indexes, rows and thumbnails.

:class:`Service` holds one :class:`~pipeline.search.Searcher` per indexed column (index
memory-mapped once, at start), loads query encoders on first use (shared by the columns
of one encoder) and makes thumbnails.  It imports no web framework: the HTTP layer is
:mod:`pipeline.serve_app`, so everything here is callable (and tested) in-process too.

Security policy, enforced here rather than in the routes (the run directory is
untrusted input, :mod:`embeddings.store`):

- an image is served only as the thumbnail of a row of the run, looked up by the row's
  id; its key comes from the embed shards and is read through the run's image source
  (:mod:`embeddings.sources`: files under a folder, objects under a remote root, members
  of tar shards), whose one confinement rule refuses a key outside its root (dataset
  links resolved and refused if they lead outside, checked again at open);
- where the images are (the image source's kind and location) is the one recorded at
  embed time when the run was sealed on this machine; for a run made elsewhere (or
  edited) the user names it (``serve --root``: a folder, a remote root, the tar shards'
  folder or URL prefix), else thumbnails are refused: a run never makes the server read a
  file or fetch a URL the user did not vouch for;
- thumbnails are cached under ``RUN/serve/thumbs`` named by their content's digest, read
  without following links and served from memory after the check: an altered cached file
  is remade, never served; when the cache cannot be written they are served uncached;
  remote tar shards are copied into a bounded cache under ``RUN/serve/cache`` (copies
  checked by their digest too; read as streams when it cannot be written);
- uploads are capped in bytes and in pixels and decoded by the embed stage's defensive
  :func:`embeddings.images.load_image` from a temporary file under ``RUN/serve/tmp``;
- query text and filter values are capped in length, ``k`` in size;
- nothing is written outside ``RUN/serve`` (thumbnails, upload temp files), never pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from embeddings.encoders import Encoder, encoder_for_column, resolve_device
from embeddings.errors import FormatError, InputError, MissingError, UserError
from embeddings.images import ImageError, decode_image, load_image
from embeddings.sources import ImageSource, OutsideRoot, source_at, source_from_dict
from embeddings.store import KINDS, Run, column_name

from .index import IndexMismatch
from .leaks import Duplicates
from .search import MODALITIES, Searcher, SearchResult, pick_column
from .via import Vias

log = logging.getLogger(__name__)


# Run directory: every path and manifest field comes from the store.  No table of every
# row is ever held: ids the server has handed out (in hits) are remembered in a bounded
# cache; any other id is found by scanning the id column shard by shard.
KNOWN_IDS = 100_000


class Refused(InputError):
    """A request for something the server never hands out (e.g. a file outside the root)."""


class TooLarge(InputError):
    """An upload over the byte or pixel cap."""


class NotReady(FormatError):
    """The run lacks what the query needs (no index, a stale one): the remedy is a command."""


@dataclass(frozen=True)
class ServeConfig:
    run: str
    device: str = "auto"
    thumb_size: int = 256  # px, longest side
    max_upload_bytes: int = 8 * 2**20
    max_upload_pixels: int = 40_000_000
    max_query_chars: int = 500
    max_k: int = 200
    max_filter_chars: int = 200
    source_cache_bytes: int = 2 * 2**30  # copies of remote tar shards for thumbnails
    root: str | None = None  # where the images are, named by the user (default: the sealed)

    def limits(self) -> dict[str, int]:
        return {"max_upload_bytes": self.max_upload_bytes, "max_k": self.max_k,
                "max_upload_pixels": self.max_upload_pixels,
                "max_query_chars": self.max_query_chars, "thumb_size": self.thumb_size}


class Service:
    """One run, ready to answer queries from many threads; starts without reading rows."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.run = Path(cfg.run)
        self.files = Run(self.run)
        manifest = self.files.embed.manifest()  # FormatError with a remedy if no embed stage
        self.columns = manifest.columns
        self.source: ImageSource | None = None
        self.root_problem = ""
        recorded = manifest.image_source
        if cfg.root:
            self.source = source_at(recorded, cfg.root)
        elif manifest.trusted:
            self.source = source_from_dict(recorded)
        else:
            self.root_problem = (
                f"refused: {self.run} was not sealed on this machine (made elsewhere, or "
                f"edited), so where it says its images are ({recorded.get('root')!r}) is not "
                "trusted: restart the server with --root naming the folder (or remote root, "
                "or tar shards' folder) of the images")
        if self.source is not None:
            self.source = self.source.with_cache(self.files.serve.source_cache,
                                                 cfg.source_cache_bytes)
            self._source_tag = json.dumps(self.source.describe(), sort_keys=True)
        self._cache_warned = False
        self.max_pixels = manifest.max_pixels
        self._lock = threading.Lock()
        self._searchers: dict[str, Searcher] = {}
        self._encoders: dict[str, Encoder] = {}
        self.vias = Vias(self.run, cfg.device, self.columns)
        self._encode_lock = threading.Lock()
        self._picked: dict[tuple[str, str, str | None], str] = {}
        self._known: dict[str, OrderedDict[str, int]] = {k: OrderedDict() for k in KINDS}
        self._images: OrderedDict[str, str] = OrderedDict()  # image id -> path (from hits)
        self._readers: dict[str, Any] = {}
        self._filters: dict[str, Any] | None = None
        self._dups: Duplicates | None = None  # read on the first image hits
        self.problems: dict[str, str] = {}
        for column in self.files.index.entries():  # open every index once, memory-mapped
            try:
                self.searcher(column)
            except (NotReady, FormatError) as e:
                self.problems[column] = str(e)
        for column in self.columns:
            if column not in self._searchers and column not in self.problems:
                self.problems[column] = (f"no index for column {column}: run `make index` "
                                         "(python -m pipeline index)")
        self._clean_tmp()

    # ------------------------------------------------------------------ queries

    def health(self) -> dict[str, Any]:
        """The run, its columns (indexed or not) and models, filter values and limits."""
        entries = self.files.index.entries()
        columns = {}
        for name, info in self.columns.items():
            entry = entries.get(name) if name in self._searchers else None
            columns[name] = {"kind": info.kind, "modality": info.modality,
                             "encoder": info.encoder, "dim": info.dim,
                             "indexed": entry is not None,
                             "index": entry and {"factory": entry.factory,
                                                 "ntotal": entry.ntotal},
                             "problem": self.problems.get(name)}
        models = {info.encoder: {"type": info.provenance.type, "model": info.provenance.model,
                                 "pretrained": info.provenance.pretrained}
                  for info in self.columns.values()}
        if self._filters is None:  # computed once, then cached beside the index
            values = self.files.filters.values("images")
            self._filters = {"images": values["rows"], "splits": values["splits"],
                             "labels": values["labels"]}
        return {"status": "ok" if self._searchers else "no index", "run": str(self.run),
                "columns": columns, "models": models, **self._filters,
                "limits": self.cfg.limits(), "adapters": self.vias.listing()}

    def search_text(self, text: str, modality: str = "image", k: int = 10,
                    split: str | None = None, label: str | None = None,
                    column: str | None = None, via: str | None = None) -> SearchResult:
        text = (text or "").strip()
        if not text:
            raise InputError("empty query: type some text, or upload an image")
        if len(text) > self.cfg.max_query_chars:
            raise InputError(f"query too long: {len(text)} characters "
                             f"(limit {self.cfg.max_query_chars})")
        k, split, label = self._check(modality, k, split, label)
        if via:  # through an adapter (pipeline.via): its source encoder, then the map
            return self.vias.search(self, via, text, modality, column, k, split, label)
        searcher = self.searcher(self._pick(modality, "text", column))
        with self._encoding(searcher) as enc:
            vector = enc.encode_texts([text])
        return self._remember(searcher.search_vector(vector, text, k, split, label))

    def search_upload(self, data: bytes, filename: str = "upload", modality: str = "image",
                      k: int = 10, split: str | None = None, label: str | None = None,
                      column: str | None = None) -> SearchResult:
        """Search by an uploaded image file's bytes (decoded like the embed stage does)."""
        if len(data) > self.cfg.max_upload_bytes:
            raise TooLarge(f"upload too large: {len(data)} bytes "
                           f"(limit {self.cfg.max_upload_bytes})")
        if not data:
            raise InputError("empty upload: choose an image file")
        k, split, label = self._check(modality, k, split, label)
        searcher = self.searcher(self._pick(modality, "image", column))
        image = self._decode_upload(data)
        with self._encoding(searcher) as enc:
            if "image" not in enc.modalities or enc.image_transform is None:
                raise InputError(f"{searcher.info.provenance.model} cannot embed images")
            vector = enc.encode_images(enc.image_transform(image).unsqueeze(0))
        name = Path(filename or "upload").name[:100]
        return self._remember(searcher.search_vector(vector, f"image:{name}", k, split, label))

    def similar(self, row_id: str, source: str = "image", modality: str = "image",
                k: int = 10, split: str | None = None,
                label: str | None = None) -> SearchResult:
        """"More like this": the stored vector of row ``row_id`` (an image row when
        ``source`` is image, a caption row when text) is the query; no encoder needed."""
        if source not in MODALITIES:
            raise InputError(f"source must be one of {MODALITIES}, not {source!r}")
        k, split, label = self._check(modality, k, split, label)
        col = self._pick(modality, source, None)
        query_column = column_name(self.columns[col].encoder, source)
        kind = self.columns[query_column].kind
        row = self._row_of(kind, row_id)
        if row is None:
            what = "image" if kind == "images" else "caption"
            raise MissingError(f"no {what} row with id {row_id[:200]!r} in this run")
        info = self.columns[query_column]
        vector = self._reader(kind).read_vectors(query_column, info.dim, [row])[0]
        vector = vector.astype("float32")
        return self._remember(self.searcher(col).search_vector(
            vector[None], f"like:{row_id}", k, split, label))

    # ------------------------------------------------------------------ thumbnails

    def thumbnail(self, image_id: str) -> bytes:
        """The JPEG thumbnail of image row ``image_id``: cached on first request, served
        from memory after its digest is checked (uncached when the cache is unwritable)."""
        rel = self._image_of(image_id)
        if not rel:
            raise MissingError(f"no image row with id {image_id[:200]!r} in this run")
        if self.source is None:
            raise Refused(self.root_problem)
        size = self.cfg.thumb_size
        key = hashlib.sha256(f"{image_id}\0{rel}\0{size}\0{self._source_tag}".encode()
                             ).hexdigest()[:32]
        try:
            cached = self.files.serve.thumbnail(key)
        except (UserError, OSError) as e:
            self._cache_problem(e)
            cached = None
        if cached is not None:
            return cached
        try:
            image = decode_image(self.source.read(rel), max_pixels=self.max_pixels)
        except OutsideRoot:
            raise Refused(f"refused: the image of this row lies outside the dataset root "
                          f"{self.source.location}") from None
        except ImageError as e:
            raise MissingError(f"cannot read the image of row {image_id!r}: {e}") from None
        image.thumbnail((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        try:  # unique temp name + rename: concurrent first requests never see half a file
            self.files.serve.save_thumbnail(key, data)
        except (UserError, OSError) as e:
            self._cache_problem(e)
        return data

    def _cache_problem(self, error: BaseException) -> None:
        if not self._cache_warned:
            self._cache_warned = True
            log.warning("thumbnail cache unusable (%s): serving thumbnails uncached", error)

    # ------------------------------------------------------------------ state

    def searcher(self, column: str) -> Searcher:
        """The column's searcher, opened once (index memory-mapped, rows read)."""
        found = self._searchers.get(column)
        if found is not None:
            return found
        with self._lock:
            if column not in self._searchers:
                try:
                    s = Searcher(self.run, column, device=self.cfg.device)
                except IndexMismatch as e:
                    raise NotReady(str(e)) from None
                self._searchers[column] = s
                self.problems.pop(column, None)
            return self._searchers[column]

    @contextmanager
    def _encoding(self, searcher: Searcher) -> Iterator[Encoder]:
        """The searcher's encoder, loaded once per encoder.  One query encodes at a time,
        whatever its encoder: tokenizers are not thread-safe, torch already spreads one
        query over the cores, and concurrent encodes contend for the GIL (bench_serve on
        2 cores: 35 q/s with a lock per encoder, 75 q/s with this single lock)."""
        name = searcher.info.encoder
        with self._lock:
            if name not in self._encoders:
                self._encoders[name] = encoder_for_column(searcher.info,
                                                          resolve_device(self.cfg.device))
        with self._encode_lock:
            yield self._encoders[name]

    def _pick(self, modality: str, query: str, column: str | None) -> str:
        key = (modality, query, column)
        if key not in self._picked:
            try:
                self._picked[key] = pick_column(self.run, modality, query, column)
            except ValueError as e:  # an unknown --column is a FormatError there
                raise InputError(str(e)) from None
        return self._picked[key]

    def _check(self, modality: str, k: int, split: str | None,
               label: str | None) -> tuple[int, str | None, str | None]:
        if modality not in MODALITIES:
            raise InputError(f"modality must be one of {MODALITIES}, not {modality!r}")
        if not 1 <= k <= self.cfg.max_k:
            raise InputError(f"k must be between 1 and {self.cfg.max_k}, not {k}")
        for name, value in (("split", split), ("label", label)):
            if value and len(value) > self.cfg.max_filter_chars:
                raise InputError(f"{name} too long (limit {self.cfg.max_filter_chars})")
        return k, split or None, label or None

    def _reader(self, kind: str) -> Any:
        """Point reads of one kind's shards, made once (row offsets, recent row groups)."""
        with self._lock:
            if kind not in self._readers:
                self._readers[kind] = self.files.embed.reader(kind)
            return self._readers[kind]

    def _remember(self, result: SearchResult) -> SearchResult:
        """Keep the rows of the hits handed out: their ids come back for thumbnails and
        more-like-this (bounded: the oldest are forgotten, then found by a scan)."""
        kind = self.columns[result.column].kind
        with self._lock:
            for h in result.hits:
                _put(self._known[kind], h.id, h.row)
                if h.image is not None:
                    _put(self._images, h.image_id or h.id, h.image)
        if kind == "images":  # a hit with copies in the run says so (RUN/dedup)
            dups = self._duplicates()
            result.hits = [replace(h, duplicates=dups.of(h.row) or None) for h in result.hits]
        return result

    def _duplicates(self) -> Duplicates:
        with self._lock:
            if self._dups is None:
                self._dups = Duplicates(self.files)
            return self._dups

    def _row_of(self, kind: str, row_id: str) -> int | None:
        with self._lock:
            row = self._known[kind].get(row_id)
        if row is None:
            row = self._reader(kind).find_ids([row_id]).get(row_id)
            if row is not None:
                with self._lock:
                    _put(self._known[kind], row_id, row)
        return row

    def _image_of(self, image_id: str) -> str | None:
        with self._lock:
            rel = self._images.get(image_id)
        if rel is None:
            row = self._row_of("images", image_id)
            if row is None:
                return None
            rel = self._reader("images").read_rows([row], ["image"]).column(0)[0].as_py()
            with self._lock:
                _put(self._images, image_id, rel)
        return rel

    def _decode_upload(self, data: bytes) -> Image.Image:
        try:
            return self._decode_via_file(data)
        except ImageError as e:
            error = TooLarge if str(e).startswith("image too large") else InputError
            raise error(f"cannot use the uploaded image: {e}") from None

    def _decode_via_file(self, data: bytes) -> Image.Image:
        """Through a temporary file under ``RUN/serve/tmp``, deleted at once; from memory
        (the same decoder and reasons) when that folder cannot be written."""
        try:
            tmp_dir = self.files.serve.scratch()
            tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix="upload-", suffix=".img")
        except (UserError, OSError) as e:
            self._cache_problem(e)
            return decode_image(data, max_pixels=self.cfg.max_upload_pixels)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return load_image(tmp, max_pixels=self.cfg.max_upload_pixels)
        except OSError:
            return decode_image(data, max_pixels=self.cfg.max_upload_pixels)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _clean_tmp(self, older_than_s: float = 3600.0) -> None:
        """Upload temp files a killed server left behind (not a live server's)."""
        try:
            tmp_dir = self.files.serve.scratch()
            if not tmp_dir.is_dir():
                return
            for path in tmp_dir.glob("upload-*"):
                if time.time() - path.lstat().st_mtime > older_than_s:
                    path.unlink(missing_ok=True)
        except (UserError, OSError) as e:
            self._cache_problem(e)


def _put(cache: OrderedDict[str, Any], key: str, value: Any) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > KNOWN_IDS:
        cache.popitem(last=False)
