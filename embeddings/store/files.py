"""File mechanics of a run directory: atomic writes, digests, confinement, clear JSON errors.

Every file of a run is written through a temporary file with a unique name in the same
folder (so two writers never share a temp file), fsynced, given the mode the umask
allows (like any file the user creates), then renamed into place.  Temporary files
left by a killed process start with ``.`` and end in ``.tmp``: :func:`clean_temps`
removes them when a stage starts under its lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import xxhash

from ..errors import FormatError, InputError, UserError

TMP_SUFFIX = ".tmp"
# Encoder, column and head names become file names: keep them boring.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
DIGEST = "xxh3_128"  # fast (GB/s): verification stays a small fraction of read time


class DiskFull(UserError, OSError):
    """No space left while writing a run file; what was finished before is kept."""


def check_name(name: str, what: str) -> str:
    """``name`` if it is safe as a file name component, else InputError."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise InputError(f"{what} {name!r} is not a valid name: use letters, digits and "
                         "_ . + - (no slashes, no '..', at most 128 characters)")
    return name


def confined(base: Path, rel: str | os.PathLike, what: str = "path") -> Path:
    """``base / rel``, refusing anything that resolves outside ``base`` (FormatError).

    Paths read from run-directory files could have been tampered with; a stage must never
    read or delete outside its own folder because a manifest said so.
    """
    rel_s = str(rel)
    if "\x00" in rel_s or not rel_s:
        raise FormatError(f"{what} {rel_s!r} in {base} is not a valid relative path")
    root = base.resolve()
    target = (root / rel_s).resolve()
    if target != root and root not in target.parents:
        raise FormatError(f"{what} {rel_s!r} escapes {base}: the run directory was tampered "
                          "with; refusing to touch it")
    return target


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn ENOSPC / EDQUOT while writing ``path`` into one clear :class:`DiskFull`."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left on device while writing {path}: finished files are "
                           "kept, free some space and rerun the same command") from None
        raise


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A unique temporary path beside ``path``; renamed onto it when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with disk_errors(path):
            yield tmp
            os.chmod(tmp, _umask_mode())  # mkstemp makes 0600; run files follow the umask
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a unique temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def read_json(path: Path, what: str, remedy: str, kind: type = dict) -> Any:
    """Parse a run-directory JSON file; any problem is one FormatError naming the file."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise FormatError(f"{what} {path} is missing: {remedy}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{what} {path} is corrupt ({e}): {remedy}") from None
    if not isinstance(data, kind):
        raise FormatError(f"{what} {path} is corrupt (a JSON {type(data).__name__}, expected "
                          f"a {kind.__name__}): {remedy}")
    return data


def digest_file(path: Path) -> str:
    """Fast content digest of a file (``xxh3_128`` hex)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path, name: str) -> dict[str, Any]:
    """``{"file", "bytes", "digest"}`` of a written file, as manifests record it."""
    return {"file": name, "bytes": path.stat().st_size, "digest": digest_file(path)}


def check_file(path: Path, record: dict[str, Any], what: str, remedy: str,
               full: bool = True) -> None:
    """FormatError unless ``path`` has the size (and, when ``full``, digest) recorded."""
    if not path.is_file():
        raise FormatError(f"{what} {path} is missing: {remedy}")
    size = path.stat().st_size
    if size != record.get("bytes"):
        raise FormatError(f"{what} {path} is corrupt ({size} bytes, {record.get('bytes')} "
                          f"recorded): {remedy}")
    if full and digest_file(path) != record.get("digest"):
        raise FormatError(f"{what} {path} is corrupt (its checksum does not match the one "
                          f"recorded): {remedy}")


def clean_temps(folder: Path) -> int:
    """Remove temporary files a killed writer left in ``folder`` and its subfolders."""
    n = 0
    if folder.is_dir():
        for tmp in folder.rglob(f".*{TMP_SUFFIX}"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                n += 1
    return n
