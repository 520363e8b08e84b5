"""File mechanics of a run directory: atomic writes, digests, confinement, no links.

Every file of a run is written through a temporary file with a unique name in the same
folder (so two writers never share a temp file), fsynced, given the mode the umask
allows (like any file the user creates), then renamed into place.  Temporary files
left by a killed process start with ``.`` and end in ``.tmp``: :func:`clean_temps`
removes them when a stage starts under its lock.

A run directory is untrusted input (runs are copied, shared, downloaded): nothing in it
is followed as a symbolic link.  Folders are checked with ``lstat`` from the run down
(:func:`no_links`), files are opened with ``O_NOFOLLOW``, and a link anywhere inside
the run stops the command with one line naming it (:class:`Tampered`).  The run
directory itself (``--run``) is the user's choice and may be a link.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import xxhash

from ..errors import FormatError, InputError, UserError
from ..names import NAME_RE, check_name

TMP_SUFFIX = ".tmp"
DIGEST = "xxh3_128"  # fast (GB/s): verification stays a small fraction of read time
NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
__all__ = ["NAME_RE", "check_name"]


class DiskFull(UserError, OSError):
    """No space (or no inode) left while writing a run file; finished files are kept."""


class Tampered(FormatError):
    """A symbolic link (or a special file) where the run directory holds plain files."""


def tampered(path: Path | str, what: str = "symbolic link") -> Tampered:
    return Tampered(f"{path} is a {what}: a run directory is untrusted input and nothing "
                    "in it is followed (it was tampered with, or copied with its links): "
                    "replace it with the real file or folder, or remove it")


def no_links(root: Path, path: Path) -> Path:
    """``path``, after checking that no existing component of it below ``root`` is a
    symbolic link or, short of the last, anything but a folder (:class:`Tampered`)."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise FormatError(f"{path} is not inside {root}") from None
    current = root
    for i, part in enumerate(rel.parts):
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return path  # the rest does not exist yet: nothing to follow
        except NotADirectoryError:
            raise tampered(current.parent, "file where a folder belongs") from None
        if stat.S_ISLNK(st.st_mode):
            raise tampered(current)
        if i < len(rel.parts) - 1 and not stat.S_ISDIR(st.st_mode):
            raise tampered(current, "file where a folder belongs")
    return path


def confined(base: Path, rel: str | os.PathLike, what: str = "path",
             root: Path | None = None, source: Path | None = None, remedy: str = "") -> Path:
    """``base / rel`` for a relative path read from a run file: refused (FormatError) if it
    is absolute, climbs out with ``..`` or passes through a symbolic link (checked from
    ``root``, the run, when given, else from ``base``).  ``source`` (the file naming it)
    and ``remedy`` complete the message.

    Paths read from run-directory files could have been tampered with; a stage must never
    read or delete outside its own folder because a manifest said so.
    """
    rel_s = str(rel)
    named = f" named by {source}" if source else ""
    tail = f": {remedy}" if remedy else ""
    if "\x00" in rel_s or not rel_s:
        raise FormatError(f"{what} {rel_s!r}{named} is not a valid relative path{tail}")
    parts = rel_s.split("/")
    if rel_s.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in parts):
        raise FormatError(f"{what} {rel_s!r}{named} escapes {base}: the run directory was "
                          f"tampered with; refusing to touch it{tail}")
    return no_links(root or base, base.joinpath(*parts))


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """Turn an OSError while writing ``path`` into one clear line: :class:`DiskFull` for no
    space or no inodes (ENOSPC, EDQUOT), an InputError for a place that cannot be written."""
    try:
        yield
    except UserError:
        raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left on device while writing {path}: finished files are "
                           "kept, free some space (or inodes) and rerun the same command"
                           ) from None
        if e.errno == errno.ELOOP:
            raise tampered(e.filename or path) from None
        reason = e.strerror or type(e).__name__
        if e.errno in (errno.ENOTDIR, errno.EEXIST):
            reason = "a file stands where a folder belongs"
        raise InputError(f"cannot write {path}: {reason}"
                         + (f" ({e.filename})" if e.filename and str(e.filename) != str(path)
                            else "") + ": choose a writable place") from None


disk_errors = write_errors  # the older name


def make_dirs(root: Path, folder: Path) -> Path:
    """Create ``folder`` (and its parents below ``root``) refusing links on the way."""
    no_links(root, folder)
    with write_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    return no_links(root, folder)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A unique temporary path beside ``path``; renamed onto it when the block succeeds.
    The rename replaces a link at ``path`` instead of writing through it."""
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                        suffix=TMP_SUFFIX)
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with write_errors(path):
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


def open_file(path: Path) -> int:
    """A read-only descriptor of the regular file ``path``, never through a link at its
    last component (earlier ones: :func:`no_links`).  FileNotFoundError if missing."""
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise tampered(path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise tampered(path, "folder or special file where a file belongs")
    return fd


def read_bytes(path: Path) -> bytes:
    with os.fdopen(open_file(path), "rb") as f:
        return f.read()


def read_json(path: Path, what: str, remedy: str, kind: type = dict) -> Any:
    """Parse a run-directory JSON file; any problem is one FormatError naming the file."""
    try:
        data = json.loads(read_bytes(path))
    except FileNotFoundError:
        raise FormatError(f"{what} {path} is missing: {remedy}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise FormatError(f"{what} {path} is corrupt ({why}): {remedy}") from None
    except OSError as e:
        raise FormatError(f"cannot read {what} {path} ({e.strerror}): {remedy}") from None
    if not isinstance(data, kind):
        raise FormatError(f"{what} {path} is corrupt (a JSON {type(data).__name__}, expected "
                          f"a {kind.__name__}): {remedy}")
    return data


def digest_file(path: Path) -> str:
    """Fast content digest of a file (``xxh3_128`` hex), never read through a link."""
    h = xxhash.xxh3_128()
    with os.fdopen(open_file(path), "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path, name: str) -> dict[str, Any]:
    """``{"file", "bytes", "digest"}`` of a written file, as manifests record it."""
    return {"file": name, "bytes": os.lstat(path).st_size, "digest": digest_file(path)}


def check_file(path: Path, record: dict[str, Any], what: str, remedy: str,
               full: bool = True) -> None:
    """FormatError unless ``path`` is a plain file with the size (and, when ``full``,
    digest) recorded; a link there is refused, never followed."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise FormatError(f"{what} {path} is missing: {remedy}") from None
    if stat.S_ISLNK(st.st_mode):
        raise tampered(path)
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{what} {path} is missing (not a file): {remedy}")
    if st.st_size != record.get("bytes"):
        raise FormatError(f"{what} {path} is corrupt ({st.st_size} bytes, "
                          f"{record.get('bytes')} recorded): {remedy}")
    if full and digest_file(path) != record.get("digest"):
        raise FormatError(f"{what} {path} is corrupt (its checksum does not match the one "
                          f"recorded): {remedy}")


def clean_temps(folder: Path) -> int:
    """Remove temporary files a killed writer left in ``folder`` and its subfolders
    (links are neither followed nor counted: the caller checked ``folder`` itself)."""
    n = 0
    for dirpath, _dirs, filenames in os.walk(folder):  # does not descend into links
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") and name.endswith(TMP_SUFFIX) and path.is_file() \
                    and not path.is_symlink():
                path.unlink(missing_ok=True)
                n += 1
    return n
