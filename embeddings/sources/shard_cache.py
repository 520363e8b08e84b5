"""Local copies of remote tar shards, for reading one member (``serve``'s thumbnails).

The copies live in a folder of the run directory (``RUN/serve/cache``), which is untrusted
input like the rest of the run: a copy is named by the digest of its content
(``<url hash>.<xxh3_128>.tar``), checked by this process before its first use (and again
whenever the file changes), and opened without following a link; a copy that is altered,
a link or not a plain file is removed and fetched again, never read.  The folder is
bounded (least recently used copies go first).  When it cannot be written (a full disk, a
read-only run), :meth:`ShardCache.open` raises :class:`CacheUnusable` and the caller reads
the shard as a stream instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

from .remote import READ_CHUNK, LocalError

SUFFIX = ".tar"
STALE_S = 3600.0
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
Folder = Path | Callable[[], Path]  # a folder, or a function giving it (checked) at each use


class CacheUnusable(LocalError):
    """The cache folder cannot be used (unwritable, full, a link): read without it."""


class ShardCache:
    def __init__(self, folder: Folder, limit: int) -> None:
        self.folder, self.limit = folder, limit
        self._sound: dict[str, tuple[int, ...]] = {}  # copies checked: name -> stat signature
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "limit": self.limit}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["limit"])  # type: ignore[misc]

    def where(self) -> Path:
        try:
            return self.folder() if callable(self.folder) else self.folder
        except Exception as e:  # the run's guard refused the folder (a link, a file)
            raise CacheUnusable(str(e)) from None

    def open(self, url: str, fetch: Callable[[BinaryIO], None]) -> BinaryIO:
        """A readable file of the copy of ``url`` (made with ``fetch(file)`` when there is
        no sound one); the caller closes it.  Errors of ``fetch`` pass through."""
        folder = self.where()
        prefix = hashlib.sha256(url.encode()).hexdigest()[:32]
        found = self._find(folder, prefix)
        return found if found is not None else self._fetch(folder, prefix, fetch)

    # ------------------------------------------------------------------ reuse

    def _find(self, folder: Path, prefix: str) -> BinaryIO | None:
        try:
            with os.scandir(folder) as it:
                names = [e.name for e in it if e.name.startswith(prefix + ".")
                         and e.name.endswith(SUFFIX)]
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CacheUnusable(f"{folder}: {e.strerror}") from None
        for name in names:
            f = self._checked(folder / name)
            if f is not None:
                return f
            with contextlib.suppress(OSError):  # altered, a link, or not a file
                (folder / name).unlink(missing_ok=True)
        return None

    def _checked(self, path: Path) -> BinaryIO | None:
        try:
            fd = os.open(path, _FLAGS)
        except OSError:  # a link (ELOOP), gone, unreadable
            return None
        f = os.fdopen(fd, "rb")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                f.close()
                return None
            with self._lock:
                known = self._sound.get(path.name) == _signature(st)
            if not known and _name(path.name.split(".")[0], _digest(f)) != path.name:
                f.close()
                return None
            with contextlib.suppress(OSError):  # most recently used (if it may be written)
                os.utime(fd)
            with self._lock:
                self._sound[path.name] = _signature(os.fstat(fd))
            f.seek(0)
            return f
        except OSError:
            f.close()
            return None

    # ------------------------------------------------------------------ fetch

    def _fetch(self, folder: Path, prefix: str, fetch: Callable[[BinaryIO], None]) -> BinaryIO:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{prefix}.", suffix=".tmp")
        except OSError as e:
            raise CacheUnusable(f"{folder}: {e.strerror}") from None
        f = os.fdopen(fd, "w+b")
        try:
            fetch(_Writer(f))  # network errors pass through
            try:
                f.flush()
                name = _name(prefix, _digest(f))
                os.replace(tmp, folder / name)  # the open file stays ours whatever happens
                with self._lock:
                    self._sound[name] = _signature(os.fstat(f.fileno()))
            except OSError as e:
                raise CacheUnusable(f"cannot write the shard cache: {e.strerror}") from None
        except BaseException:
            f.close()
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
            raise
        with contextlib.suppress(OSError):  # best effort: the copy is made either way
            self._evict(folder, keep=name)
        f.seek(0)
        return f

    def _evict(self, folder: Path, keep: str) -> None:
        """Drop other copies of the same shard, downloads a killed server left (an hour
        old), then the least recently used copies past the limit."""
        prefix = keep.split(".")[0]
        copies = []
        for e in os.scandir(folder):
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:  # another thread's eviction
                continue
            if e.name.startswith(".") and e.name.endswith(".tmp") \
                    and time.time() - st.st_mtime > STALE_S:
                (folder / e.name).unlink(missing_ok=True)
            if e.name == keep or not e.name.endswith(SUFFIX):
                continue
            if e.name.startswith(prefix + ".") or not stat.S_ISREG(st.st_mode):
                (folder / e.name).unlink(missing_ok=True)
            else:
                copies.append((st.st_mtime_ns, st.st_size, e.name))
        try:
            total = sum(size for _, size, _ in copies) + os.lstat(folder / keep).st_size
        except FileNotFoundError:  # evicted by another thread already (our file stays open)
            return
        for _, size, name in sorted(copies):
            if total <= self.limit:
                break
            total -= size
            (folder / name).unlink(missing_ok=True)


class _Writer:
    """The copy's file as ``fetch`` sees it: a local write error is the cache's, not the
    network's (never retried as one)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            raise CacheUnusable(f"cannot write the shard cache: {e.strerror}") from None

    def restart(self) -> None:
        """Back to empty (a retried download starts over)."""
        self.f.seek(0)
        self.f.truncate()


def _digest(f: BinaryIO) -> str:
    f.seek(0)
    h = xxhash.xxh3_128()
    while chunk := f.read(READ_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _name(prefix: str, digest: str) -> str:
    return f"{prefix}.{digest}{SUFFIX}"


def _signature(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
