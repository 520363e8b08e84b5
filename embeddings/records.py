"""Ingest: a dataset description -> image and caption records with stable string ids.

Supported inputs (``format="auto"`` picks by path):

- a manifest table (``.csv``, ``.jsonl``/``.ndjson``, ``.parquet``) with columns
  ``image`` (path relative to the root), ``caption`` or ``captions``, ``label`` and/or
  ``labels`` (list, or ``|``-separated in CSV), optional ``split`` and ``id``.  Rows that
  share an image (or an explicit id) are one image with several captions;
- an image folder ``ROOT/<class>/<file>`` (or ``ROOT/<split>/<class>/<file>``);
- COCO-captions JSON (``images`` + ``annotations``) and Karpathy-split JSON
  (``images[*].sentences``), one image with several captions.

Images and captions are separate records: one per image, one per caption carrying its
``image_id``.  Problems found here (duplicate ids, paths escaping the root, empty
captions, missing fields) become :class:`Reject` entries, never exceptions.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from .errors import InputError, MissingError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
SPLITS = {"train", "val", "valid", "validation", "test", "restval"}
IMAGE_KEYS = ("image", "image_path", "filepath", "file_name", "path")
CAPTION_KEYS = ("captions", "caption", "text")
LABEL_SEP = "|"


@dataclass(frozen=True)
class ImageRecord:
    id: str
    image: str  # path relative to the dataset root, POSIX separators
    split: str | None = None
    label: str | None = None
    labels: tuple[str, ...] = ()
    captions: tuple[str, ...] = ()


@dataclass(frozen=True)
class CaptionRecord:
    id: str
    image_id: str | None
    caption: str
    split: str | None = None
    label: str | None = None
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reject:
    kind: str  # "images" or "captions"
    id: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "id": self.id, "reason": self.reason}


@dataclass
class Dataset:
    root: Path
    source: str
    format: str
    images: list[ImageRecord] = field(default_factory=list)
    captions: list[CaptionRecord] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.images)} images, {len(self.captions)} captions, "
            f"{len(self.rejects)} rejected at ingest ({self.format}: {self.source})"
        )


def load_dataset(path: str | os.PathLike, root: str | os.PathLike | None = None,
                 format: str = "auto") -> Dataset:
    """Read any supported dataset description into a :class:`Dataset`."""
    path = Path(path)
    if not path.exists():
        raise MissingError(f"dataset not found: {path}")
    fmt = detect_format(path) if format == "auto" else format
    base = Path(root) if root is not None else (path if path.is_dir() else path.parent)
    builder = _Builder(base.resolve(), str(path), fmt)
    if fmt == "imagefolder":
        builder.add_rows(_imagefolder_rows(path))
    elif fmt in ("csv", "jsonl", "parquet"):
        builder.add_rows(_table_rows(path, fmt))
    elif fmt == "coco":
        builder.add_rows(_coco_rows(_read_json(path)))
    elif fmt == "karpathy":
        builder.add_rows(_karpathy_rows(_read_json(path)))
    else:
        raise InputError(
            f"unknown dataset format {fmt!r}: "
            "use csv, jsonl, parquet, imagefolder, coco or karpathy"
        )
    return builder.finish()


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "imagefolder"
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".json":
        data = _read_json(path)
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            return "coco"
        if isinstance(data, dict) and any("sentences" in i for i in data.get("images", [])[:5]):
            return "karpathy"
        raise InputError(f"{path}: JSON is neither COCO-captions nor Karpathy-split format")
    raise InputError(f"cannot tell the format of {path}: pass format= (csv, jsonl, parquet, ...)")


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _table_rows(path: Path, fmt: str) -> Iterator[dict[str, Any]]:
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        yield {"_error": f"line {n}: invalid JSON ({e.msg})", "id": f"line:{n}"}
        return
    if fmt == "csv":
        # csv.DictReader keeps every value as text: ids like "007" stay strings.
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                yield {k: (v if v != "" else None) for k, v in row.items() if k is not None}
        return
    yield from pq.read_table(path).to_pylist()


def _imagefolder_rows(root: Path) -> Iterator[dict[str, Any]]:
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        split = None
        class_dirs = [cls_dir]
        if cls_dir.name.lower() in SPLITS:
            split = cls_dir.name
            class_dirs = sorted(p for p in cls_dir.iterdir() if p.is_dir())
        for d in class_dirs:
            for f in sorted(d.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                    yield {"image": f.relative_to(root).as_posix(), "label": d.name, "split": split}


def _coco_rows(data: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    caps: dict[Any, list[tuple[str, str]]] = {}
    for a in data["annotations"]:
        caps.setdefault(a.get("image_id"), []).append((str(a.get("id")), a.get("caption") or ""))
    for img in data["images"]:
        yield {"id": str(img.get("id")), "image": img.get("file_name"),
               "split": img.get("split"), "_captions": caps.get(img.get("id"), [])}


def _karpathy_rows(data: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for img in data["images"]:
        rel = "/".join(p for p in (img.get("filepath"), img.get("filename")) if p)
        sents = [(str(s.get("sentid")), s.get("raw") or " ".join(s.get("tokens", [])))
                 for s in img.get("sentences", [])]
        yield {"id": str(img.get("cocoid", img.get("imgid"))), "image": rel,
               "split": img.get("split"), "_captions": sents}


def _first(row: Mapping[str, Any], keys: Iterable[str]) -> Any:
    for k in keys:
        if row.get(k) not in (None, ""):
            return row[k]
    return None


def _as_list(value: Any, sep: str | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None]
    text = str(value)
    return [p.strip() for p in text.split(sep)] if sep else [text]


def _clean(text: Any) -> str | None:
    return None if text is None else str(text).strip() or None


class _Builder:
    """Merges raw rows into records, in first-seen order, collecting rejects."""

    def __init__(self, root: Path, source: str, fmt: str) -> None:
        self.ds = Dataset(root=root, source=source, format=fmt)
        self._images: dict[str, dict[str, Any]] = {}
        self._order: list[str] = []

    def add_rows(self, rows: Iterable[dict[str, Any]]) -> None:
        for n, row in enumerate(rows):
            self._add(n, row)

    def _reject(self, kind: str, rid: str, reason: str) -> None:
        self.ds.rejects.append(Reject(kind, rid, reason))

    def _add(self, n: int, row: dict[str, Any]) -> None:
        if "_error" in row:
            self._reject("images", row["id"], row["_error"])
            return
        image = _first(row, IMAGE_KEYS)
        rid = _clean(row.get("id")) or (image and _normalise(str(image))) or f"row:{n}"
        if image is None:
            self._reject("images", rid, "no image path in row")
            return
        rel = self._safe_relpath(str(image))
        if rel is None:
            self._reject("images", rid, f"image path escapes the dataset root: {image}")
            return
        labels = _as_list(row.get("labels"), LABEL_SEP)
        label = _clean(row.get("label")) or (labels[0] if len(labels) == 1 else None)
        if label and label not in labels:
            labels.insert(0, label)
        if "_captions" in row:
            captions = list(row["_captions"])
        else:
            value = _first(row, CAPTION_KEYS)
            captions = [(None, c) for c in _as_list(value, None)]
        entry = {"id": rid, "image": rel, "split": _clean(row.get("split")), "label": label,
                 "labels": labels, "captions": []}
        prev = self._images.get(rid)
        if prev is not None:
            same = all(prev[k] == entry[k] for k in ("image", "split", "label", "labels"))
            if not same:
                self._reject("images", rid, f"duplicate id (row {n} disagrees with an earlier row)")
                return
            entry = prev
        else:
            self._images[rid] = entry
            self._order.append(rid)
        for cid, text in captions:
            entry["captions"].append((cid, text))

    def _safe_relpath(self, image: str) -> str | None:
        root = self.ds.root
        target = (root / image).resolve()
        try:
            return target.relative_to(root).as_posix()
        except ValueError:
            return None

    def finish(self) -> Dataset:
        seen_caption_ids: set[str] = set()
        for rid in self._order:
            e = self._images[rid]
            kept: list[str] = []
            for k, (cid, text) in enumerate(e["captions"]):
                cid = cid or f"{rid}#{k}"
                clean = _clean(text)
                if clean is None:
                    self._reject("captions", cid, "empty caption")
                    continue
                if cid in seen_caption_ids:
                    self._reject("captions", cid, "duplicate caption id")
                    continue
                seen_caption_ids.add(cid)
                kept.append(clean)
                self.ds.captions.append(CaptionRecord(
                    id=cid, image_id=rid, caption=clean, split=e["split"], label=e["label"],
                    labels=tuple(e["labels"])))
            self.ds.images.append(ImageRecord(
                id=rid, image=e["image"], split=e["split"], label=e["label"],
                labels=tuple(e["labels"]), captions=tuple(kept)))
        return self.ds


def _normalise(path: str) -> str:
    return Path(os.path.normpath(path)).as_posix()


# ---------------------------------------------------------------------------- blocks

@dataclass(frozen=True)
class Block:
    """The ``index``-th group of at most ``size`` image records, with their captions and
    the ingest rejects of the rows read for them: what one embed shard pair covers."""

    index: int
    images: tuple[ImageRecord, ...]
    captions: tuple[CaptionRecord, ...]
    rejects: tuple[Reject, ...]


@dataclass
class Source:
    """A dataset opened for reading block by block."""

    root: Path
    source: str
    format: str
    _dataset: Dataset | None = None

    def blocks(self, size: int, skip: Container[int] = ()) -> Iterator[Block]:
        ds = self._dataset or load_dataset(self.source, self.root, self.format)
        self._dataset = ds
        by_image: dict[str | None, list[CaptionRecord]] = {}
        for c in ds.captions:
            by_image.setdefault(c.image_id, []).append(c)
        for k, start in enumerate(range(0, max(len(ds.images), 1), size)):
            if k in skip:
                continue
            images = ds.images[start:start + size]
            caps = tuple(c for im in images for c in by_image.get(im.id, []))
            yield Block(k, tuple(images), caps, tuple(ds.rejects) if k == 0 else ())


def open_dataset(path: str | os.PathLike, root: str | os.PathLike | None = None,
                 format: str = "auto") -> Source:
    path = Path(path)
    if not path.exists():
        raise MissingError(f"dataset not found: {path}")
    fmt = detect_format(path) if format == "auto" else format
    base = Path(root) if root is not None else (path if path.is_dir() else path.parent)
    return Source(base.resolve(), str(path), fmt)
