"""One writer per run-directory stage: an advisory ``flock`` held for the whole stage.

The kernel drops the lock when its process dies however it dies, so a stale lock of a
killed run never blocks the next one; the file only carries who holds it, for the
message.  A second writer fails at once instead of waiting.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from types import TracebackType

from ..errors import Locked

LOCK_NAME = ".lock"


class StageLock:
    """``with StageLock(stage_dir, run):`` holds the exclusive lock of one stage folder."""

    def __init__(self, folder: Path, label: str) -> None:
        self.path = folder / LOCK_NAME
        self.label = label
        self._fd: int | None = None

    def __enter__(self) -> StageLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise Locked(f"{self.label} is being written by {holder}: wait for it to finish "
                         "(or stop it) and rerun") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "since": _now()}).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"process {int(info['pid'])} since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
