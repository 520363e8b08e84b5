"""The one rule for where a dataset's images may be read: inside the dataset root.

An image path (relative to the root, or absolute) is resolved with every link followed;
anything that ends up outside the root is refused with the reason ``image path escapes
the dataset root``.  Ingest applies it to every row (:mod:`embeddings.ingest.rows`,
with a per-folder cache), and every reader applies it again when it opens the file
(:func:`open_in_root`: the embed stage's decoders, ``serve``'s thumbnails), so a link
swapped in after the check leads nowhere.  Kept alone so an image source registry can
take it over whole.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

ESCAPE_REASON = "image path escapes the dataset root"


class EscapesRoot(ValueError):
    """An image path that leads outside the dataset root; ``str()`` is the reject reason."""

    def __init__(self) -> None:
        super().__init__(ESCAPE_REASON)


def relative_in_root(root: str, target: str) -> str | None:
    """``target`` (absolute, normalised or real) relative to ``root`` (real), or None when
    it lies outside."""
    if target.startswith(root.rstrip(os.sep) + os.sep):
        return target[len(root.rstrip(os.sep)) + 1:]
    return None


def resolve_in_root(root: str | os.PathLike, rel: str | os.PathLike) -> Path:
    """``root/rel`` with every link resolved; :class:`EscapesRoot` if it leaves ``root``."""
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(real_root, rel))
    if relative_in_root(real_root, target) is None:
        raise EscapesRoot()
    return Path(target)


def open_in_root(root: str | os.PathLike, rel: str | os.PathLike) -> int:
    """A read-only descriptor of ``root/rel``, checked by :func:`resolve_in_root` and
    opened without following a link (one swapped in since the check is refused)."""
    target = resolve_in_root(root, rel)
    try:
        return os.open(target, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise EscapesRoot() from None
        raise
