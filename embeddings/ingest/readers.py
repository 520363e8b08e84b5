"""One reader per manifest format, each yielding canonical chunks (see ``normalise``).

CSV and Parquet stream through pyarrow in chunks (every CSV column read as text, so ids
like ``007`` stay strings); JSONL is parsed line by line so one bad line is one reject;
COCO / Karpathy JSON are loaded whole (a few hundred MB at most) and image folders are
walked, both then cut into chunks like the rest.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from ..errors import InputError
from .normalise import IMAGE_KEYS, KNOWN_COLUMNS, error_rows, from_columns, from_rows

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
SPLITS = {"train", "val", "valid", "validation", "test", "restval"}
ROWS_PER_CHUNK = 16_384  # row formats: rows per canonical chunk
CSV_BLOCK_BYTES = 4 << 20  # CSV read unit (Arrow reads a few ahead); the longest row allowed
FORMATS = ("csv", "jsonl", "parquet", "imagefolder", "coco", "karpathy")


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
        data = read_json(path)
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            return "coco"
        if isinstance(data, dict) and any(
                isinstance(i, dict) and "sentences" in i for i in data.get("images", [])[:5]):
            return "karpathy"
        raise InputError(f"{path}: JSON is neither COCO-captions nor Karpathy-split format")
    raise InputError(f"cannot tell the format of {path}: pass format= (csv, jsonl, parquet, ...)")


def check_utf8(path: Path) -> None:
    """Fail before any work when a text manifest is not UTF-8, naming the line and the fix."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.isascii() and not decoder.getstate()[0]:
                offset += len(chunk)  # ASCII is UTF-8: no decoding (10x faster)
                continue
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                at = offset + e.start
                f.seek(0)
                line = 1 + f.read(at).count(b"\n")
                raise InputError(
                    f"{path} is not UTF-8 text (line {line}: byte {chunk[e.start]:#04x}); "
                    f"manifests must be UTF-8: convert it, e.g. `iconv -f latin1 -t utf-8 "
                    f"{path} > {path.with_suffix('.utf8' + path.suffix)}`") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise InputError(f"{path} ends in the middle of a UTF-8 character: "
                             f"the file is truncated or not UTF-8") from None


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except UnicodeDecodeError:
        check_utf8(path)
        raise
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except RecursionError:
        raise InputError(f"{path}: invalid JSON: nested too deeply") from None


def _chunked(rows: Iterable[Mapping[str, Any]]) -> Iterator[pa.Table]:
    buf: list[Mapping[str, Any]] = []
    n = 0
    for row in rows:
        buf.append(row)
        if len(buf) == ROWS_PER_CHUNK:
            yield from_rows(buf, n)
            n += len(buf)
            buf = []
    if buf:
        yield from_rows(buf, n)


def csv_chunks(path: Path) -> Iterator[pa.Table]:
    check_utf8(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise InputError(f"{path} is empty: a manifest needs a header line and data rows")
    _require_image_column(path, header)
    columns = [c for c in dict.fromkeys(header) if c in KNOWN_COLUMNS]
    malformed: list[tuple[str, str]] = []

    def skip_row(row: Any) -> str:
        # Arrow does not say where the row was, so these rejects land in the last block.
        text = row.text if len(row.text) <= 80 else row.text[:77] + "..."
        malformed.append((f"csv:{text}", f"malformed CSV row: expected {row.expected_columns}"
                                         f" fields, got {row.actual_columns}"))
        return "skip"

    try:
        reader = pcsv.open_csv(
            path, read_options=pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
            parse_options=pcsv.ParseOptions(newlines_in_values=True,
                                            invalid_row_handler=skip_row),
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in columns}, include_columns=columns,
                strings_can_be_null=False, check_utf8=False))  # checked above
        n = 0
        for batch in reader:
            yield from_columns(batch, n)
            n += batch.num_rows
    except pa.ArrowInvalid as e:
        raise InputError(f"{path}: cannot read this CSV ({e}); a single row may be at most "
                         f"{CSV_BLOCK_BYTES >> 20} MB") from None
    if malformed:
        yield error_rows(malformed, n)


def _require_image_column(path: Path, names: Iterable[str]) -> None:
    if not set(names) & set(IMAGE_KEYS):
        raise InputError(f"{path} has no image column: name one of {', '.join(IMAGE_KEYS)}")


def parquet_chunks(path: Path) -> Iterator[pa.Table]:
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        _require_image_column(path, names)
        n = 0
        for batch in pf.iter_batches(batch_size=65_536,
                                     columns=[c for c in names if c in KNOWN_COLUMNS]):
            yield from_columns(batch, n)
            n += batch.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise InputError(f"{path}: cannot read this Parquet file ({e})") from None


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    check_utf8(path)
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield {"_error": f"invalid JSON: line {n}: {e.msg}", "id": f"line:{n}"}
                continue
            except RecursionError:
                yield {"_error": f"invalid JSON: line {n}: nested too deeply",
                       "id": f"line:{n}"}
                continue
            if not isinstance(row, dict):
                yield {"_error": f"not a JSON object: line {n} is a {type(row).__name__}",
                       "id": f"line:{n}"}
                continue
            yield row


def jsonl_chunks(path: Path) -> Iterator[pa.Table]:
    return _chunked(_jsonl_rows(path))


def imagefolder_chunks(root: Path) -> Iterator[pa.Table]:
    return _chunked(_imagefolder_rows(root))


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


def _json_with(path: Path, *keys: str) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in keys):
        raise InputError(f"{path}: expected a JSON object with the list(s) {', '.join(keys)}")
    return data


def coco_chunks(path: Path) -> Iterator[pa.Table]:
    data = _json_with(path, "images", "annotations")
    caps: dict[Any, list[tuple[str, str]]] = {}
    for a in data["annotations"]:
        caps.setdefault(a.get("image_id"), []).append((str(a.get("id")), a.get("caption") or ""))
    return _chunked({"id": str(img.get("id")), "image": img.get("file_name"),
                     "split": img.get("split"), "_captions": caps.get(img.get("id"), [])}
                    for img in data["images"])


def karpathy_chunks(path: Path) -> Iterator[pa.Table]:
    def rows() -> Iterator[dict[str, Any]]:
        for img in _json_with(path, "images")["images"]:
            rel = "/".join(p for p in (img.get("filepath"), img.get("filename")) if p)
            sents = [(str(s.get("sentid")), s.get("raw") or " ".join(s.get("tokens", [])))
                     for s in img.get("sentences", [])]
            yield {"id": str(img.get("cocoid", img.get("imgid"))), "image": rel,
                   "split": img.get("split"), "_captions": sents}
    return _chunked(rows())


READERS: dict[str, Callable[[Path], Iterator[pa.Table]]] = {
    "csv": csv_chunks, "jsonl": jsonl_chunks, "parquet": parquet_chunks,
    "imagefolder": imagefolder_chunks, "coco": coco_chunks, "karpathy": karpathy_chunks,
}


def chunks(path: Path, fmt: str) -> Iterator[pa.Table]:
    """Canonical chunks of ``path``."""
    if fmt not in READERS:
        raise InputError(f"unknown dataset format {fmt!r}: use {', '.join(FORMATS)}")
    if not os.path.exists(path):
        raise InputError(f"dataset not found: {path}")
    return READERS[fmt](path)


def prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """``items``, produced in a background thread at most ``depth`` ahead; its exceptions
    are raised here, and stopping early stops the thread."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as e:  # handed to the consumer
            q.put((done, e))

    thread = threading.Thread(target=produce, name="ingest-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
