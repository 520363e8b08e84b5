"""Image sources: where image bytes come from, by kind (a registry, like the encoders').

- ``files``: :class:`FileSource`, images under a local root folder (the default);
- ``url``: :class:`UrlSource`, one object per image under a remote root (``s3://``,
  ``gs://``, ``az://``, ``http(s)://``, through fsspec);
- ``webdataset``: :class:`TarSource`, tar shards, local or remote, read whole and in order.

:func:`open_source` picks one for a dataset root; :func:`source_from_dict` reopens the one
a manifest describes (:meth:`ImageSource.describe`), and :func:`source_at` the same kind
at a location the user names (a run not sealed on this machine is not trusted to say where
to read: ``serve --root``); :func:`register_source` adds kinds.
Only ``files`` needs nothing beyond the base install; the remote kinds need ``fsspec`` and
the protocol's package (``pip install -e ".[remote]"`` for S3 and HTTP).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ..errors import FormatError, InputError
from .base import ESCAPES, Checked, ImageSource, MemorySource, OutsideRoot, read_key
from .files import FileSource
from .remote import Network, is_url, redact
from .tar import TarSource, expand
from .urls import UrlSource

Opener = Callable[[Mapping[str, Any], Network], ImageSource]
SOURCES: dict[str, Opener] = {}


def register_source(kind: str, opener: Opener) -> None:
    """``opener(description, network) -> ImageSource`` reopens a source of ``kind`` from
    what its :meth:`~ImageSource.describe` wrote."""
    SOURCES[kind] = opener


register_source("files", lambda d, net: FileSource(d["root"]))
register_source("url", lambda d, net: UrlSource(d["root"], net))
register_source("webdataset", lambda d, net: TarSource(
    [f"{d['root']}/{_shard_name(s)}" for s in d["shards"]], net))


def _shard_name(name: Any) -> str:
    """A recorded shard's name under the shards' folder: a plain relative path (a run's
    manifest cannot point a source above the folder it names)."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name \
            or name.startswith("/") or is_url(name) or any(
                p in ("", ".", "..") for n in (name, unquote(name)) for p in n.split("/")):
        raise FormatError(f"the run's image source names a shard {str(name)[:80]!r} that is "
                          "not a plain path under its folder")
    return name


def open_source(root: str | os.PathLike, net: Network | None = None) -> ImageSource:
    """The source for images under ``root``: a URL (``s3://b/prefix``, ``https://h/p``)
    or a local folder."""
    text = str(root)
    return UrlSource(text, net) if is_url(text) else FileSource(Path(text))


def as_source(where: ImageSource | str | os.PathLike) -> ImageSource:
    """``where`` as a source: a source as is, a folder or URL through :func:`open_source`."""
    return where if isinstance(where, ImageSource) else open_source(where)


def source_from_dict(d: Mapping[str, Any], net: Network | None = None) -> ImageSource:
    """The source a manifest describes; FormatError when the description is unusable."""
    kind = d.get("kind") if isinstance(d, Mapping) else None
    if kind not in SOURCES:
        raise FormatError(f"unknown image source {kind!r} in the run's manifest; "
                          f"known: {sorted(SOURCES)}")
    try:
        return SOURCES[kind](d, net or Network())
    except (KeyError, TypeError) as e:
        raise FormatError(f"the run's image source description is incomplete ({e})") from None


def source_at(d: Mapping[str, Any], location: str, net: Network | None = None) -> ImageSource:
    """The kind of source ``d`` describes, reading under ``location`` (a folder, or a
    remote root; for tar shards their folder or URL prefix) instead of the root ``d``
    records; its keys (and shard names) stay confined under ``location``."""
    kind = d.get("kind") if isinstance(d, Mapping) else None
    remote = is_url(location)
    if (kind == "files" and remote) or (kind == "url" and not remote):
        want = "a remote root (s3://..., https://...)" if kind == "url" else "a local folder"
        raise InputError(f"the run's images are {kind!r} images: the location must be {want}, "
                         f"not {redact(location)}")
    root = location if remote else str(Path(location).resolve())
    return source_from_dict({**d, "root": root.rstrip("/") or "/"}, net)


__all__ = ["ESCAPES", "SOURCES", "Checked", "FileSource", "ImageSource", "MemorySource",
           "Network", "OutsideRoot", "TarSource", "UrlSource", "as_source", "expand",
           "is_url", "open_source", "read_key", "redact", "register_source",
           "source_at", "source_from_dict"]
