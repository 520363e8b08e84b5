"""Local image files under one root folder: the path rules and the root confinement.

A key is a path relative to the root (POSIX separators), or an absolute path inside it.
Rejected: anything that leaves the root lexically (``../x``, ``/etc/x``) or through a
symlinked folder or file (a dataset's links that stay inside the root are followed).
This is the one confinement rule for local images: :meth:`FileSource.check` decides a
whole column with Arrow kernels at ingest (Python only for odd paths and symlinked
folders, with a cache of folders); :meth:`FileSource.read` (the embed stage's decoders,
Ray tasks, ``serve``'s thumbnails) applies it again to the one path it reads: resolved,
refused outside the root, then opened without following a link, so a link swapped in
after the check, or a run directory edited to point elsewhere, reads nothing.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..arrow import np_values, replace_at
from ..images import ImageError, read_image_fd
from .base import ESCAPES, Checked, ImageSource, OutsideRoot
from .remote import is_url, redact

# Paths os.path.normpath would change: these rows take the Python path.
_ODD = r"\x00|(^|/)\.\.?(/|$)|//|^/|/$"  # (URLs have "//")
URL_ROOT = "image is a URL but the dataset root is a local folder (set root to the URLs' prefix)"
_DIR_CACHE = 4096


class FileSource(ImageSource):
    kind = "files"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self._root = str(self.root)
        self._dirs: OrderedDict[str, tuple[str | None, frozenset[str]]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"])  # type: ignore[misc]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": self._root}

    # ------------------------------------------------------------------ one key

    def resolve(self, key: str) -> Path:
        """``key`` under the root with symlinks resolved; :class:`OutsideRoot` if it leaves
        the root."""
        if "\x00" in key:
            raise OutsideRoot("image path contains a NUL byte")
        target = os.path.realpath(os.path.join(self._root, key))
        if self._inside(target) is None:
            raise OutsideRoot(f"{ESCAPES}: {key}")
        return Path(target)

    def read(self, key: str) -> bytes:
        return read_image_fd(self.open(key))

    def open(self, key: str) -> int:
        """A read-only descriptor of image ``key``: checked by :meth:`resolve`, then opened
        without following a link (one swapped in since the check is refused); not blocking,
        so a FIFO named as an image is refused, not waited on."""
        target = self.resolve(key)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(target, flags)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutsideRoot(f"{ESCAPES}: {key}") from None
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise ImageError("missing file") from None
            raise ImageError(f"unreadable image: {type(e).__name__}: {e.strerror}") from None

    # ------------------------------------------------------------------ a column

    def check(self, keys: pa.Array) -> Checked:
        n = len(keys)
        cand = np.asarray(keys.is_valid())
        odd = cand & np_values(pc.match_substring_regex(keys, _ODD))  # usually none
        escape = np.zeros(n, bool)
        urls: set[int] = set()
        rel, ids = keys, keys
        if odd.any():
            idx = np.flatnonzero(odd)
            fixed, normal = [], []
            for i, p in zip(idx, keys.take(pa.array(idx)).to_pylist()):
                normal.append(os.path.normpath(p))
                r = None if "\x00" in p or is_url(p) else self._inside(
                    os.path.normpath(os.path.join(self._root, p)))
                escape[i] = r is None
                if is_url(p):
                    urls.add(int(i))
                fixed.append(r or "")
            rel, ids = replace_at(keys, idx, fixed), replace_at(keys, idx, normal)
        rel, escape = self._symlinks(rel, cand & ~escape, escape)
        reasons = pa.nulls(n, pa.string())
        if escape.any():
            idx = np.flatnonzero(escape)
            why = [f"{URL_ROOT if i in urls else ESCAPES}: {redact(p)}"
                   for i, p in zip(idx.tolist(), keys.take(pa.array(idx)).to_pylist())]
            reasons = replace_at(reasons, idx, why)
        return Checked(rel, ids, reasons)

    def _inside(self, target: str) -> str | None:
        """``target`` (absolute, normalised or real) relative to the root, or None when it
        lies outside: the test every other method ends in."""
        root = self._root.rstrip(os.sep)
        if target.startswith(root + os.sep):
            return target[len(root) + 1:]
        return None

    def _dir(self, d: str) -> tuple[str | None, frozenset[str]]:
        """A folder's real path relative to the root (None: outside), and its symlinks."""
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
        """Resolve symlinked folders and files, so a link cannot lead out of the root."""
        parts = pc.split_pattern(rel, "/", max_splits=1, reverse=True)
        dirs = pc.if_else(pc.equal(pc.list_value_length(parts), 2), pc.list_element(parts, 0), "")
        odd_dirs = set()
        kept = dirs.filter(pa.array(ok))
        if len(kept) > 1:  # manifests list a folder's files together: drop repeats first
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
        return replace_at(rel, idx, fixed), escape
