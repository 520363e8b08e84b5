"""webdataset tar shards, local or remote: read whole shards in order, members as they come.

Shards are given as a brace pattern (``shards/{00000..00127}.tar``, ``{a,b}.tar``) or a
list, all local or all under one URL scheme.  :meth:`TarSource.read_shard` streams one
shard front to back with :mod:`tarfile` (``r|*``: no seek, gzip too), one attempt after
another on network errors (a dropped stream restarts the shard), and reports a corrupt or
truncated tar as the reason alongside the members read before the damage.  It never runs
a shell (webdataset's ``pipe:`` URLs are not accepted).

An image's key is ``SHARD/MEMBER`` (``00003.tar/000030012.jpg``); :meth:`TarSource.read`
finds one member, for the search page's thumbnails: a local shard by its headers, a remote
one from a copy kept in a bounded cache (:meth:`TarSource.with_cache`,
:mod:`.shard_cache`: copies checked by their digest, never through a link), or read as a
stream up to the member when there is no usable cache.
"""

from __future__ import annotations

import gzip
import logging
import os
import posixpath
import re
import shutil
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

from ..errors import InputError
from ..images import ImageError
from .base import ESCAPES, Checked, ImageSource, OutsideRoot, nonempty
from .remote import READ_CHUNK, Network, Remote, call, check_root, is_url, protocol, redact
from .shard_cache import CacheUnusable, Folder, ShardCache

SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_MEMBER_BYTES = 256 << 20  # a member larger than this is skipped unread
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
log = logging.getLogger(__name__)


def expand(pattern: str) -> list[str]:
    """Brace expansion: ``{00000..00003}`` (zero padding kept) and ``{a,b}`` alternatives."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = _RANGE.match(body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).lstrip("-").startswith("0") else 0
        step = 1 if hi >= lo else -1
        items = [f"{k:0{width}d}" for k in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:  # not a brace expression: kept as written
        return [head + "{" + body + "}" + x for x in expand(tail)]
    return [x for item in items for x in expand(head + item + tail)]


@dataclass
class ShardRead:
    """One shard read front to back: its file members in order, the members passed over
    (with why), and the reason it ended early (None: read to the end)."""

    members: list[tuple[str, bytes]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None


class Chunked:
    """Reads of any size served from large reads of ``raw``: tarfile asks for 10 KiB at a
    time, and each read of a remote stream is a round trip to fsspec's event loop."""

    def __init__(self, raw: BinaryIO, chunk: int = READ_CHUNK * 4) -> None:
        self.raw, self.chunk = raw, chunk
        self.buf, self.pos, self.eof = bytearray(), 0, False

    def read(self, n: int = -1) -> bytes:
        while not self.eof and (n < 0 or len(self.buf) - self.pos < n):
            got = self.raw.read(self.chunk)
            if not got:
                self.eof = True
            else:
                del self.buf[:self.pos]
                self.pos = 0
                self.buf += got
        end = len(self.buf) if n < 0 else min(len(self.buf), self.pos + n)
        out = bytes(self.buf[self.pos:end])
        self.pos = end
        return out


def read_members(f: BinaryIO, max_member_bytes: int = MAX_MEMBER_BYTES) -> ShardRead:
    """Stream a tar from ``f``; damage ends the read with a reason, network errors raise."""
    out = ShardRead()
    try:
        with tarfile.open(fileobj=Chunked(f), mode="r|*") as tf:  # type: ignore[call-overload]
            for m in tf:
                if m.isdir():
                    continue
                if not m.isfile():
                    out.skipped.append((m.name, "not a regular file"))
                elif m.size > max_member_bytes:
                    out.skipped.append((m.name, f"member too large: {m.size} bytes "
                                                f"(limit {max_member_bytes})"))
                else:
                    data = tf.extractfile(m)
                    out.members.append((m.name, data.read() if data else b""))
    except _TAR_ERRORS as e:
        out.error = f"corrupt or truncated tar: {e or type(e).__name__}"
    return out


class TarSource(ImageSource):
    kind = "webdataset"

    def __init__(self, shards: str | list[str] | tuple[str, ...], net: Network | None = None,
                 cache: ShardCache | None = None) -> None:
        urls = [s for p in ([shards] if isinstance(shards, str) else shards) for s in expand(p)]
        if not urls:
            raise InputError("no tar shards given")
        for u in urls:
            if u.startswith("pipe:"):
                raise InputError(f"{u[:60]!r}: shell pipe: URLs are not accepted; give the "
                                 "shards' paths or URLs (s3://, https://, ...)")
            if not u.lower().endswith(SUFFIXES):
                raise InputError(f"{redact(u)} is not a tar shard (expected {', '.join(SUFFIXES)})")
        self.net = net or Network()
        self.base, self.shards = _split_base(urls)
        self.remote = Remote(protocol(self.base), self.net, self.base) \
            if is_url(self.base) else None
        self.cache = cache
        self._warned = False
        self._names = {s: i for i, s in enumerate(self.shards)}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": redact(self.base), "shards": list(self.shards)}

    def with_cache(self, folder: Folder, max_bytes: int) -> TarSource:
        if self.remote is None:
            return self  # local shards are read in place
        return TarSource([self.url(i) for i in range(len(self.shards))], self.net,
                         ShardCache(folder, max_bytes))

    def url(self, i: int) -> str:
        return f"{self.base}/{self.shards[i]}"

    # ------------------------------------------------------------------ whole shards

    def read_shard(self, i: int, max_member_bytes: int = MAX_MEMBER_BYTES) -> ShardRead:
        """Shard ``i`` front to back (a remote one retried whole on network errors)."""
        url = self.url(i)
        if self.remote is None:
            try:
                with open(url, "rb") as f:
                    return read_members(f, max_member_bytes)
            except FileNotFoundError:
                return ShardRead(error=f"not found: {url}")
            except OSError as e:
                return ShardRead(error=f"unreadable: {url}: {e}")
        remote = self.remote

        def attempt() -> ShardRead:
            with remote.open_stream(url) as f:
                return read_members(f, max_member_bytes)
        try:
            return call(attempt, url, self.net)
        except ImageError as e:
            return ShardRead(error=str(e))

    def sidecar(self, i: int) -> bytes | None:
        """img2dataset's ``NAME.parquet`` beside shard ``i``, or None when there is none;
        :class:`ImageError` when it exists but cannot be read."""
        url = _with_suffix(self.url(i), ".parquet")
        if self.remote is None:
            try:
                return Path(url).read_bytes()
            except FileNotFoundError:
                return None
            except OSError as e:
                raise ImageError(f"unreadable: {url}: {e}") from None
        try:
            return self.remote.cat(url)
        except ImageError as e:
            if str(e).startswith("not found"):
                return None
            raise

    # ------------------------------------------------------------------ one member

    def split(self, key: str) -> tuple[int, str]:
        """``SHARD/MEMBER`` -> (shard number, member name); :class:`OutsideRoot` for a
        shard this source does not list."""
        parts = key.split("/")
        for k in range(1, len(parts)):
            i = self._names.get("/".join(parts[:k]))
            if i is not None:
                return i, "/".join(parts[k:])
        raise OutsideRoot(f"{ESCAPES}: {redact(key)} is in none of the source's shards")

    def read(self, key: str) -> bytes:
        i, member = self.split(key)
        try:
            if self.remote is None:
                with tarfile.open(self.url(i), "r:*") as tf:
                    return _member(tf, member)
            copy = self._copy(i)
            if copy is None:
                return self._stream_member(i, member)
            with copy, tarfile.open(fileobj=copy, mode="r:*") as tf:
                return _member(tf, member)
        except KeyError:
            raise ImageError("missing file") from None
        except FileNotFoundError:
            raise ImageError(f"not found: {redact(self.url(i))}") from None
        except _TAR_ERRORS as e:
            raise ImageError(f"corrupt or truncated tar: {e}") from None

    def check(self, keys: pa.Array) -> Checked:
        why = []
        for key in keys.to_pylist():
            try:
                ok = key is None or bool(self.split(key)[1])
            except OutsideRoot:
                ok = False
            why.append(None if ok else f"{ESCAPES}: {key}")
        return Checked(keys, keys, pa.array(why, pa.string()))

    def _copy(self, i: int) -> BinaryIO | None:
        """An open local copy of remote shard ``i`` (downloaded whole on first use), or None
        when there is no usable cache (:class:`CacheUnusable`: logged once)."""
        if self.cache is None or self.remote is None:
            return None
        url, remote = self.url(i), self.remote

        def fetch(out: Any) -> None:
            def attempt() -> None:
                out.restart()
                with remote.open_stream(url) as src:
                    shutil.copyfileobj(src, out, READ_CHUNK)
            call(attempt, url, self.net)
        try:
            return self.cache.open(url, fetch)
        except CacheUnusable as e:
            if not self._warned:
                self._warned = True
                log.warning("shard cache unusable (%s): reading remote shards as streams", e)
            return None

    def _stream_member(self, i: int, member: str) -> bytes:
        """One member of remote shard ``i``, read as a stream from its start (no cache)."""
        url, remote = self.url(i), self.remote
        assert remote is not None

        def attempt() -> bytes | None:
            with remote.open_stream(url) as f, \
                    tarfile.open(fileobj=Chunked(f), mode="r|*") as tf:  # type: ignore[call-overload]
                for m in tf:
                    if m.name == member:
                        data = tf.extractfile(m) if m.isfile() else None
                        return data.read() if data is not None else None
            return None
        data = call(attempt, url, self.net)
        if data is None:
            raise ImageError("missing file")
        return nonempty(data)


def _member(tf: tarfile.TarFile, member: str) -> bytes:
    info = tf.getmember(member)
    data = tf.extractfile(info) if info.isfile() else None
    if data is None:
        raise ImageError("missing file")
    return nonempty(data.read())


def _with_suffix(url: str, suffix: str) -> str:
    for s in SUFFIXES:
        if url.lower().endswith(s):
            return url[:-len(s)] + suffix
    return url + suffix


def _split_base(urls: list[str]) -> tuple[str, tuple[str, ...]]:
    """The shards' common folder (absolute path or URL prefix) and their names under it."""
    remote = {is_url(u) for u in urls}
    if len(remote) > 1:
        raise InputError("tar shards must be all local or all remote, not a mix")
    if remote == {True}:
        for u in urls:
            check_root(u, "shard URL")
        heads = {u[:u.index("://") + 3].lower() + u[u.index("://") + 3:].split("/")[0]
                 for u in urls}
        if len(heads) > 1:
            raise InputError(f"tar shards must share one scheme and host/bucket, got "
                             f"{sorted(redact(h) for h in heads)[:3]}")
        head = heads.pop()
        paths = [u[len(head):] or "/" for u in urls]
        common = posixpath.commonpath([posixpath.dirname(p) or "/" for p in paths])
        base = head + common.rstrip("/")
        return base, tuple(p[len(common.rstrip("/")) + 1:] for p in paths)
    absolute = [os.path.abspath(u) for u in urls]
    common = os.path.commonpath([os.path.dirname(p) for p in absolute])
    base = os.path.realpath(common)
    return base, tuple(os.path.relpath(p, common).replace(os.sep, "/") for p in absolute)
