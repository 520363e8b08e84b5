"""What every image source is: keys in, bytes out, one confinement rule per source.

A source turns an image key (a manifest's image path, a URL under a remote root, a tar
member ``SHARD/MEMBER``) into the image's bytes.  Decoding never knows where bytes live:
the decode paths call :func:`read_key` and hand the bytes to PIL or the batch decoder.
A source is picklable (Ray ships it to its tasks; DataLoader workers inherit it), checks a
whole column of keys at once (:meth:`ImageSource.check`: the rule that decides what may be
read, applied at ingest) and applies the same rule again to every single read, so a key
that leaves the source's root is refused wherever it comes from (a manifest, a run
directory, a URL typed into the search page).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from ..images import ImageError

ESCAPES = "image path escapes the dataset root"  # the reject reason class of a confinement


class OutsideRoot(ImageError):
    """A key that resolves outside the source's root: refused, never read."""


@dataclass(frozen=True)
class Checked:
    """The outcome of :meth:`ImageSource.check` for a column of keys (nulls stay null).

    ``keys``: where each image is read from (normalised; symlinked folders resolved for
    files); ``ids``: the key's lexical normal form, the id of a row that has none;
    ``reasons``: null for a key that may be read, else the reject reason.
    """

    keys: pa.Array
    ids: pa.Array
    reasons: pa.Array


class ImageSource:
    """Base of the registered sources (:mod:`embeddings.sources`)."""

    kind: ClassVar[str] = ""

    def read(self, key: str) -> bytes:
        """The bytes of image ``key``; :class:`~embeddings.images.ImageError` with the
        reject reason when they cannot be had (:class:`OutsideRoot` when refused)."""
        raise NotImplementedError

    def check(self, keys: pa.Array) -> Checked:
        """Normalise a column of keys and say which ones this source refuses, and why."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """``{"kind", "root", ...}`` for the manifest: enough to reopen the source,
        never a credential."""
        raise NotImplementedError

    @property
    def location(self) -> str:
        """The root as recorded (a folder, or a URL without credentials)."""
        return str(self.describe()["root"])

    def with_cache(self, folder: Path, max_bytes: int) -> ImageSource:
        """This source, keeping what it fetches from far away under ``folder`` (at most
        ``max_bytes``); sources with nothing worth caching return themselves."""
        return self


class MemorySource(ImageSource):
    """Bytes already in memory, by key: the images of a tar shard read in one pass."""

    kind = "memory"

    def __init__(self, data: Mapping[str, bytes]) -> None:
        self.data = data

    def read(self, key: str) -> bytes:
        data = self.data.get(key)
        if data is None:
            raise ImageError("missing file")
        return nonempty(data)

    def check(self, keys: pa.Array) -> Checked:
        return Checked(keys, keys, pa.nulls(len(keys), pa.string()))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": ""}


def nonempty(data: bytes) -> bytes:
    if not data:
        raise ImageError("empty file (0 bytes)")
    return data


def read_key(source: ImageSource, key: str) -> bytes:
    """The one place the decode paths get an image's bytes (a content digest, when one is
    wanted, belongs here)."""
    return source.read(key)
