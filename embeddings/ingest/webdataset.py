"""webdataset tar shards (img2dataset's output) as a dataset: one block per shard.

Members are grouped into samples by key (webdataset's rule: the member name up to the first
dot of its base name; the rest is the extension).  A sample is one image (``jpg``,
``jpeg``, ``png`` or ``webp``), its caption (the ``txt`` member, or a configured JSON
field), its label, labels and split (configured JSON fields; the label may also come from
a ``cls`` member); its key is its id and ``SHARD/MEMBER`` its image key.  The samples then
go through the same row rules as a manifest's rows (:mod:`.rows`, :mod:`.blocks`), so
captions, labels and ids behave alike.

Shard ``k`` is block ``k``: a finished shard is skipped on resume without being read, and
a block is read where it is embedded (:meth:`Block.ready`), in one sequential pass that
keeps the images' bytes for the decoder.  Memory: one shard's images per block in flight.

Rejected, each with its reason: a damaged or unreadable tar (``shards``), a member without
an extension or of an unknown kind (``members``), and per sample: ``no image in sample``,
``two images for one key``, ``duplicate id`` (a key seen earlier in the shard),
``invalid JSON``, ``caption is not UTF-8``; with a sidecar, ``missing from the tar`` and
``sidecar disagrees with the tar`` (see :mod:`.sidecar`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Container, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import InputError, MissingError
from ..images import ImageError
from ..sources import Network, TarSource, expand, is_url
from .blocks import Grouper
from .normalise import from_rows
from .records import CAPTION_SCHEMA, IMAGE_SCHEMA, Block, IngestStats, Reject
from .rows import RowChecker
from .sidecar import Sidecar, parse

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FIELD_EXTS = ("txt", "json", "cls")
_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext


@dataclass(frozen=True)
class Fields:
    """Where a sample's caption, label, labels and split come from (JSON member fields)."""

    caption: str | None = None  # default: the txt member
    label: str | None = None  # default: the cls member
    labels: str | None = None
    split: str | None = None


class TarDataset:
    """Tar shards as a dataset: the interface of :class:`.source.Source`."""

    format = "webdataset"
    fixed_blocks = True  # block k is shard k whatever the block size: finished means final

    def __init__(self, shards: str | list[str], fields: Fields, net: Network | None) -> None:
        self.image_source = TarSource(shards, net)
        self.fields = fields
        src = self.image_source
        given = shards if isinstance(shards, str) else None
        self.source = (given if given is None or is_url(given) else os.path.abspath(given)) \
            or f"{len(src.shards)} shards under {src.location}"
        self.root = src.location
        self.stats = IngestStats()
        if not is_url(src.base) and not any(
                os.path.isfile(src.url(i)) for i in range(len(src.shards))):
            raise MissingError(f"no tar shard found: {self.source}")

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "root": self.root, "format": self.format,
                "image_source": self.image_source.describe(), "fields": asdict(self.fields)}

    def blocks(self, size: int, skip: Container[int] = ()) -> Iterator[Block]:
        """One block per shard, to be read where it is embedded; ``size`` does not apply."""
        self.stats = IngestStats()
        for i in range(len(self.image_source.shards)):
            self.stats.blocks += 1
            if i not in skip:
                yield Block(i, IMAGE_SCHEMA.empty_table(), CAPTION_SCHEMA.empty_table(),
                            pending=PendingShard(self.image_source, i, self.fields))


@dataclass(frozen=True)
class PendingShard:
    source: TarSource
    index: int
    fields: Fields

    def read(self) -> Block:
        return read_block(self.source, self.index, self.fields)


def open_webdataset(shards: str | list[str], fields: Fields | None = None,
                    net: Network | None = None) -> TarDataset:
    return TarDataset(shards, fields or Fields(), net)


def is_tar_pattern(path: Any) -> bool:
    items = list(path) if isinstance(path, (list, tuple)) else [str(path)]
    return bool(items) and all(
        expand(str(p))[0].lower().endswith((".tar", ".tar.gz", ".tgz")) for p in items)


# ------------------------------------------------------------------------ one shard

def read_block(source: TarSource, i: int, fields: Fields) -> Block:
    """Read shard ``i`` (once, in order) into block ``i`` with its images' bytes."""
    name = source.shards[i]
    shard = source.read_shard(i)
    rejects = [Reject("shards", name, shard.error)] if shard.error else []
    rejects += [Reject("members", f"{name}/{m}", f"unused member: {why}")
                for m, why in shard.skipped]
    samples, found = _samples(shard.members, name, rejects)
    sidecar = _sidecar(source, i, name, rejects)
    rows, payload, disagree = [], {}, 0
    for key, members in samples:
        why = sidecar.disagreement(key) if sidecar else None
        disagree += why is not None
        row = None if why else _row(key, members, name, fields, rejects)
        if why:
            rejects.append(Reject("images", key, why))
        if row is not None:
            image_key, data = row.pop("_bytes")
            payload[image_key] = data
            rows.append(row)
    if sidecar is not None:
        rejects += [Reject("images", k, f"missing from the tar (the sidecar says success): "
                                        f"{name}") for k in sorted(sidecar.success - found)]
    block = _rows_to_block(rows, source)
    return replace(block, index=i, rejects=(*rejects, *block.rejects), payload=payload,
                   sidecar=replace(sidecar, disagree=disagree) if sidecar is not None else None)


def _samples(members: list[tuple[str, bytes]], shard: str, rejects: list[Reject]
             ) -> tuple[list[tuple[str, dict[str, tuple[str, bytes]]]], set[str]]:
    """Contiguous members of one key -> samples (key, {ext: (member, bytes)}); a key met
    again later in the shard is a duplicate.  Also every key seen."""
    samples: list[tuple[str, dict[str, tuple[str, bytes]]]] = []
    seen: set[str] = set()
    dup: set[int] = set()
    for member, data in members:
        m = _NAME.match(member)
        if m is None:
            rejects.append(Reject("members", f"{shard}/{member}",
                                  "unused member: no KEY.EXTENSION name"))
            continue
        key, ext = m.group(1), m.group(2).lower()
        if not samples or samples[-1][0] != key:
            if key in seen:
                dup.add(len(samples))
            seen.add(key)
            samples.append((key, {}))
        parts = samples[-1][1]
        if ext in parts:
            ext = f"{ext}#{len(parts)}"  # the same name twice: two members
        parts[ext] = (member, data)
    for k in sorted(dup, reverse=True):
        rejects.append(Reject("images", samples[k][0],
                              f"duplicate id: key {samples[k][0]!r} appears twice in {shard}"))
        del samples[k]
    return samples, seen


def _row(key: str, members: dict[str, tuple[str, bytes]], shard: str, fields: Fields,
         rejects: list[Reject]) -> dict[str, Any] | None:
    """One sample as a manifest row (plus its image's key and bytes), or None (rejected)."""
    images = [(ext, m) for ext, m in members.items() if ext.split("#")[0] in IMAGE_EXTS]
    unused = [m[0] for ext, m in members.items()
              if ext.split("#")[0] not in IMAGE_EXTS + FIELD_EXTS]
    rejects += [Reject("members", f"{shard}/{m}", "unused member: not an image, txt, json or "
                                                  "cls member") for m in unused]
    if len(images) != 1:
        what = ", ".join(m[0] for _, m in images)
        rejects.append(Reject("images", key, f"two images for one key: {what}" if images else
                              f"no image in sample (members: {', '.join(sorted(members))})"))
        return None
    try:
        meta = _json(members.get("json")) if any(asdict(fields).values()) else {}
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        why = e.msg if isinstance(e, json.JSONDecodeError) else \
            "nested too deeply" if isinstance(e, RecursionError) else "not UTF-8"
        rejects.append(Reject("images", key, f"invalid JSON: {members['json'][0]}: {why}"))
        return None
    try:
        text = members["txt"][1].decode("utf-8") if "txt" in members else None
        cls = members["cls"][1].decode("utf-8").strip() if "cls" in members else None
    except UnicodeDecodeError:
        rejects.append(Reject("images", key, f"caption is not UTF-8: {key}"))
        return None
    member, data = images[0][1]
    row = {"id": key, "image": f"{shard}/{member}", "_bytes": (f"{shard}/{member}", data),
           "label": meta.get(fields.label) if fields.label else cls,
           "labels": meta.get(fields.labels) if fields.labels else None,
           "split": meta.get(fields.split) if fields.split else None}
    caption = meta.get(fields.caption) if fields.caption else text
    row["captions" if isinstance(caption, list) else "caption"] = caption
    return row


def _json(member: tuple[str, bytes] | None) -> dict[str, Any]:
    if member is None:
        return {}
    value = json.loads(member[1])
    if not isinstance(value, dict):
        raise json.JSONDecodeError("not a JSON object", member[1].decode("utf-8", "replace"), 0)
    return value


def _sidecar(source: TarSource, i: int, name: str, rejects: list[Reject]) -> Sidecar | None:
    try:
        data = source.sidecar(i)
        return parse(data) if data is not None else None
    except (ImageError, ValueError) as e:
        rejects.append(Reject("shards", name, f"unusable sidecar: {e} (shard read without "
                                              "reconciliation)"))
        return None


def _rows_to_block(rows: list[dict[str, Any]], source: TarSource) -> Block:
    """The samples through the manifest row rules (captions, labels, ids)."""
    if not rows:
        return Block(0, IMAGE_SCHEMA.empty_table(), CAPTION_SCHEMA.empty_table())
    table = RowChecker(source)(from_rows(rows, 0))
    blocks = list(Grouper(len(rows), (), IngestStats()).run([table]))
    if len(blocks) != 1:
        raise InputError(f"internal: {len(blocks)} blocks for one shard")
    return blocks[0]
