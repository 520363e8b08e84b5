"""Images under a remote root (``s3://bucket/prefix``, ``https://host/path``), one object each.

A key is a path relative to the root (``cats/1.jpg``) or a full URL under it
(``s3://bucket/prefix/cats/1.jpg``); both read the same object and normalise to the
relative form, which is also the default id.  Rejected: a URL on another scheme, host or
bucket, or outside the prefix, and a relative key that climbs out of it (``../x``,
``%2e%2e/x``, an absolute path), with ``image path escapes the dataset root``.
"""

from __future__ import annotations

import posixpath
from typing import Any
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..arrow import np_values, replace_at
from .base import ESCAPES, Checked, ImageSource, OutsideRoot, nonempty
from .remote import Network, Remote, check_root, is_url, protocol, redact, under

# Keys that need a look in Python: URLs, dot segments, doubled or leading slashes, escapes.
_ODD = r"://|(^|/)\.\.?(/|$)|//|^/|%|\\|\x00"


class UrlSource(ImageSource):
    kind = "url"

    def __init__(self, root: str, net: Network | None = None) -> None:
        self.root = check_root(root)
        self.net = net or Network()
        self.remote = Remote(protocol(self.root), self.net, self.root)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": redact(self.root)}

    def relative(self, key: str) -> str | None:
        """``key`` relative to the root, or None when it lies outside it."""
        if "\x00" in key or "\\" in key:
            return None
        if is_url(key):
            return under(key, self.root)
        if key.startswith("/"):
            return None
        for candidate in {key, unquote(key)}:
            norm = posixpath.normpath(candidate)
            if norm in (".", "..") or norm.startswith("../"):
                return None
        return posixpath.normpath(key)

    def url(self, key: str) -> str:
        rel = self.relative(key)
        if rel is None:
            raise OutsideRoot(f"{ESCAPES}: {redact(key)}")
        return f"{self.root}/{rel}"

    def read(self, key: str) -> bytes:
        return nonempty(self.remote.cat(self.url(key)))

    def check(self, keys: pa.Array) -> Checked:
        n = len(keys)
        odd = np.asarray(keys.is_valid()) & np_values(pc.match_substring_regex(keys, _ODD))
        reasons = pa.nulls(n, pa.string())
        if not odd.any():
            return Checked(keys, keys, reasons)
        idx = np.flatnonzero(odd)
        fixed, why = [], []
        for key in keys.take(pa.array(idx)).to_pylist():
            rel = self.relative(key)
            fixed.append(rel or "")
            why.append(None if rel is not None else f"{ESCAPES}: {redact(key)}")
        keys = replace_at(keys, idx, fixed)
        return Checked(keys, keys, replace_at(reasons, idx, why))
