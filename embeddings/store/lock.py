"""One writer per run-directory stage: an advisory ``flock`` held for the whole stage.

The kernel drops the lock when its process dies however it dies, so a stale lock of a
killed run never blocks the next one; the file only carries who holds it (and a random
token), for the message and for :func:`still_held`.  A second writer fails at once
instead of waiting.  The lock file is opened without following a link and must be a
plain file: a ``.lock`` that is a link or a FIFO in a tampered run is refused.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import stat
import time
from pathlib import Path
from types import TracebackType

from ..errors import Locked, UserError
from .files import NOFOLLOW, make_dirs, tampered, write_errors

LOCK_NAME = ".lock"


class StageLock:
    """``with StageLock(stage_dir, run):`` holds the exclusive lock of one stage folder;
    ``root`` is the run directory (no link is followed below it)."""

    def __init__(self, folder: Path, label: str, root: Path | None = None) -> None:
        self.path = folder / LOCK_NAME
        self.label = label
        self.root = root or folder
        self.token = secrets.token_hex(8)
        self._fd: int | None = None

    def __enter__(self) -> StageLock:
        make_dirs(self.root, self.path.parent)
        fd = _open(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise Locked(f"{self.label} is being written by {holder}: wait for it to finish "
                         "(or stop it) and rerun") from None
        try:
            with write_errors(self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                          "since": _now(), "token": self.token}).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def still_held(folder: Path, token: str) -> bool:
    """Whether the writer that took ``folder``'s lock with ``token`` still holds it: a
    worker asks before each file it writes, and stops when its driver is gone."""
    try:
        fd = _open(folder / LOCK_NAME, os.O_RDONLY)
    except (OSError, UserError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # someone holds it: is it still our driver?
        try:
            return json.loads(os.pread(fd, 4096, 0) or b"{}").get("token") == token
        except ValueError:
            return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)  # nobody held it: the driver is gone
        return False
    finally:
        os.close(fd)


def _open(path: Path, flags: int) -> int:
    try:
        fd = os.open(path, flags | NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise tampered(path) from None
        with write_errors(path):
            raise
        raise  # unreachable: write_errors always raises
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise tampered(path, "special file where the lock file belongs")
    return fd


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"process {int(info['pid'])} since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
