"""Integrity of a run's JSON files: a digest of their content and a seal of this machine.

Every JSON file the project reads back from a run (the run identity, the embed and index
manifests, saved head descriptions) carries ``"integrity": {"digest", "seal"}``:

- ``digest``: ``xxh3_128`` of the canonical JSON of the rest of the file.  A file whose
  content does not match it was edited or is corrupt, and is refused (one line naming it,
  listed by ``verify``): two swapped class names in a head are caught like a flipped byte.
- ``seal``: HMAC-SHA256 of the same bytes under a key kept outside every run
  (``$MMEMB_KEY_FILE``, default ``~/.config/multimodal-embeddings/run.key``, made on
  first use, mode 0600).  A file that verifies was written by this user on this machine.

Nothing dangerous depends on a file that is not sealed here (a run copied from elsewhere,
written by an older version, or edited and re-digested): its local model paths and
``pkg:`` modules are loaded only if the user's config names them, and ``serve`` shows its
images only under a root the user names (``--root``).  Without a key (no writable config
folder) runs are written unsealed, with a warning.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import xxhash

from ..errors import FormatError

FIELD = "integrity"
KEY_ENV = "MMEMB_KEY_FILE"
log = logging.getLogger(__name__)


def key_path() -> Path:
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "multimodal-embeddings" / "run.key"


@functools.lru_cache(maxsize=8)
def _key(path: str) -> bytes | None:
    p = Path(path)
    try:
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.path.lexists(p):  # written whole, then linked: no one reads half a key
            tmp = p.with_name(f".{p.name}.{secrets.token_hex(4)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
                with contextlib.suppress(FileExistsError):  # another process was first
                    os.link(tmp, p)
            finally:
                tmp.unlink(missing_ok=True)
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            key = f.read().strip().encode()
        if len(key) < 32:
            raise OSError(f"{p} holds no key (delete it to make a new one)")
        return key
    except OSError as e:
        log.warning("warning: cannot use the run sealing key %s (%s): runs written now are "
                    "not sealed, so serve will need --root and local models must be named in "
                    "your config", p, e.strerror or e)
        return None


def key() -> bytes | None:
    return _key(str(key_path()))


def _body(obj: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in obj.items() if k != FIELD}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False).encode()


def seal(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with its integrity record (digest, and the seal when there is a key)."""
    obj = json.loads(json.dumps(obj, ensure_ascii=False))  # keys as strings, tuples as lists
    body = _body(obj)
    integrity = {"digest": xxhash.xxh3_128_hexdigest(body)}
    k = key()
    if k is not None:
        integrity["seal"] = hmac.new(k, body, hashlib.sha256).hexdigest()
    return {**{n: v for n, v in obj.items() if n != FIELD}, FIELD: integrity}


def check(obj: dict[str, Any], path: Path, what: str, remedy: str) -> bool:
    """Whether ``obj`` (read from ``path``) is sealed by this machine; FormatError when its
    content does not match its digest.  A file without an integrity record (an older
    version's) is accepted as not sealed."""
    integrity = obj.get(FIELD)
    if integrity is None:
        return False
    body = _body(obj)
    if not isinstance(integrity, dict) or \
            integrity.get("digest") != xxhash.xxh3_128_hexdigest(body):
        raise FormatError(f"{what} {path} was edited or is corrupt (its content does not match "
                          f"its recorded digest): {remedy}")
    mark, k = integrity.get("seal"), key()
    return isinstance(mark, str) and k is not None and hmac.compare_digest(
        mark, hmac.new(k, body, hashlib.sha256).hexdigest())


def is_sealed_record(obj: Any) -> bool:
    """Whether ``obj`` claims a seal at all (a run written on some machine with a key)."""
    return isinstance(obj, dict) and isinstance(obj.get(FIELD), dict) \
        and "seal" in obj[FIELD]
