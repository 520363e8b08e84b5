"""The per-row pass: image paths checked and normalised, ids and field digests computed.

It needs no state but a cache of directories, so it runs in the reader thread, ahead of
the grouping.  Adds the columns ``status`` (see ``VALID`` ...), ``rel`` (path relative to
the root), ``norm`` (the normalised path: the id of a row without one), ``rid`` (the id)
and ``digest`` (of image, split, label, labels: how repeats of an id are compared), and
strips the caption entries.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..image_root import relative_in_root
from .idindex import hashes

VALID, READ_ERROR, NO_IMAGE, NUL, ESCAPE = range(5)
# NUL bytes, and paths os.path.normpath would change: these rows take the Python path.
_ODD = r"\x00|(^|/)\.\.?(/|$)|//|^/|/$"
_DIR_CACHE = 4096


def np_values(arr: pa.Array) -> np.ndarray:
    """A boolean array with nulls as False, or any other array as numpy (strings: objects)."""
    return np.asarray(pc.fill_null(arr, False)) if pa.types.is_boolean(arr.type) \
        else arr.to_numpy(zero_copy_only=False)


def take_rows(arr: pa.Array, idx: np.ndarray) -> pa.Array:
    """``arr`` at the strictly increasing positions ``idx``; a zero-copy slice when they are
    one run (usually all rows: most manifests have no rejects and no repeats)."""
    if len(idx) and int(idx[-1]) - int(idx[0]) + 1 == len(idx):
        return arr.slice(int(idx[0]), len(idx))
    return arr.take(pa.array(idx, pa.int64()))


class RowChecker:
    def __init__(self, root: Path) -> None:
        self._root = str(root)
        self._dirs: OrderedDict[str, tuple[str | None, frozenset[str]]] = OrderedDict()

    def __call__(self, t: pa.Table) -> pa.Table:
        col = {name: t.column(name).combine_chunks() for name in t.column_names}
        image = col["image"]
        if np_values(pc.starts_with(image, "./")).any():
            image = pc.replace_substring_regex(image, r"^(\./)+", "")
        err = np.asarray(col["error"].is_valid())
        noimg = ~err & np.asarray(image.is_null())
        odd = ~err & ~noimg & np_values(pc.match_substring_regex(image, _ODD))  # usually none
        nul = odd & np_values(pc.match_substring(image, "\x00")) if odd.any() else odd
        cand = ~(err | noimg | nul)
        rel, norm, escape = self._paths(image, cand, odd & cand)
        status = np.select([err, noimg, nul, escape], [READ_ERROR, NO_IMAGE, NUL, ESCAPE],
                           VALID).astype(np.int8)
        valid = np.flatnonzero(status == VALID)
        labels_key = pc.fill_null(pc.binary_join(col["labels"], "\x1e"), "")
        key = pc.binary_join_element_wise(rel, pc.fill_null(col["split"], ""),
                                          pc.fill_null(col["label"], ""), labels_key, "\x1f")
        digest = np.zeros(len(image), np.int64)
        digest[valid] = hashes(np_values(take_rows(key, valid)))
        captions = col["captions"]
        flat = pc.list_flatten(captions)
        captions = pa.ListArray.from_arrays(
            pc.subtract(captions.offsets, captions.offsets[0]) if len(captions) else
            captions.offsets, pc.utf8_trim_whitespace(flat))
        extra = {"image": image, "captions": captions, "status": pa.array(status),
                 "rel": rel, "norm": norm, "rid": pc.coalesce(col["id"], norm),
                 "digest": pa.array(digest)}
        names = [*t.column_names, *(k for k in extra if k not in col)]
        return pa.Table.from_arrays([extra.get(k, col.get(k)) for k in names], names=names)

    def _paths(self, image: pa.Array, cand: np.ndarray, odd: np.ndarray
               ) -> tuple[pa.Array, pa.Array, np.ndarray]:
        """Image paths relative to the root, the image part of default ids, and escapes."""
        escape = np.zeros(len(image), bool)
        rel, rid_img = image, image
        if odd.any():
            idx = np.flatnonzero(odd)
            fixed, ids = [], []
            for i, p in zip(idx, image.take(pa.array(idx)).to_pylist()):
                ids.append(os.path.normpath(p))
                r = self._inside(os.path.normpath(os.path.join(self._root, p)))
                escape[i] = r is None
                fixed.append(r or "")
            mask = pa.array(odd)
            rel = pc.replace_with_mask(image, mask, pa.array(fixed, pa.string()))
            rid_img = pc.replace_with_mask(image, mask, pa.array(ids, pa.string()))
        rel, escape = self._symlinks(rel, cand & ~escape, escape)
        return rel, rid_img, escape

    def _inside(self, target: str) -> str | None:
        """``target`` (absolute, normalised) relative to the root, or None outside it (the
        rule of :mod:`embeddings.image_root`, which readers apply again at open)."""
        return relative_in_root(self._root, target)

    def _dir(self, d: str) -> tuple[str | None, frozenset[str]]:
        """A directory's real path relative to the root (None: outside), and its symlinks."""
        if d in self._dirs:
            self._dirs.move_to_end(d)
            return self._dirs[d]
        real = os.path.realpath(os.path.join(self._root, d))
        inside = "" if real == self._root else self._inside(real)
        links: frozenset[str] = frozenset()
        if inside is not None:
            try:
                with os.scandir(real) as it:
                    links = frozenset(e.name for e in it if e.is_symlink())
            except OSError:
                pass
        self._dirs[d] = (inside, links)
        if len(self._dirs) > _DIR_CACHE:
            self._dirs.popitem(last=False)
        return inside, links

    def _symlinks(self, rel: pa.Array, ok: np.ndarray, escape: np.ndarray
                  ) -> tuple[pa.Array, np.ndarray]:
        """Resolve symlinked directories and files, so a link cannot lead out of the root."""
        parts = pc.split_pattern(rel, "/", max_splits=1, reverse=True)
        dirs = pc.if_else(pc.equal(pc.list_value_length(parts), 2), pc.list_element(parts, 0), "")
        odd_dirs = set()
        kept = dirs.filter(pa.array(ok))
        if len(kept) > 1:  # manifests list a directory's files together: drop repeats first
            changed = np_values(pc.not_equal(kept[1:], kept[:-1]))
            kept = kept.filter(pa.array(np.append(True, changed)))
        for d in pc.unique(kept).to_pylist():
            inside, links = self._dir(d)
            if inside != d or links:
                odd_dirs.add(d)
        if not odd_dirs:
            return rel, escape
        idx = np.flatnonzero(ok & np_values(pc.is_in(dirs, pa.array(sorted(odd_dirs)))))
        fixed = []
        for i, path in zip(idx, rel.take(pa.array(idx)).to_pylist()):
            d, _, name = path.rpartition("/")
            inside, links = self._dir(d)
            r = None
            if inside is not None:
                r = f"{inside}/{name}" if inside else name
                if name in links:
                    r = self._inside(os.path.realpath(os.path.join(self._root, r)))
            escape[i] = r is None
            fixed.append(r or "")
        return pc.replace_with_mask(rel, pa.array(np.isin(np.arange(len(rel)), idx)),
                                    pa.array(fixed, pa.string())), escape

