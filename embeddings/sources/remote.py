"""Object storage and HTTP through fsspec: one filesystem per process, bounded retries.

Credentials are never ours: s3fs, gcsfs and adlfs read them from their usual environment
variables and config files (``AWS_*`` and ``~/.aws``, ``GOOGLE_APPLICATION_CREDENTIALS``,
``AZURE_STORAGE_*``), and a URL carrying a user name or password is refused, so none can
reach a manifest.  Reasons and log lines pass through :func:`redact` (signed-URL query
values and user info are masked).

Errors: a missing object (404) or a refused one (403) is final; anything else (connection
refused, timeout, 5xx, a dropped stream) is retried ``retries`` times with exponential
backoff, then the item is rejected as ``unreachable``.  HTTP redirects are followed only
while they stay under the source's root.
"""

from __future__ import annotations

import importlib
import os
import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar
from urllib.parse import unquote, urljoin, urlsplit

from ..errors import InputError
from ..images import ImageError
from .base import OutsideRoot

T = TypeVar("T")
URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
            "abfs": "adlfs", "abfss": "adlfs", "http": "aiohttp", "https": "aiohttp"}
_SECRET = re.compile(r"(?i)([?&](?:x-amz-[a-z-]+|signature|sig|se|sp|sv|token|access_token|"
                     r"key|api_key|apikey|password|secret|credential)=)[^&#\s'\"]*")
_USERINFO = re.compile(r"(://)[^/@\s'\"]+@")
READ_CHUNK = 1 << 20


def is_url(text: str) -> bool:
    m = URL_RE.match(text)
    return bool(m) and m.group(1).lower() != "file"


def protocol(url: str) -> str:
    m = URL_RE.match(url)
    return m.group(1).lower() if m else "file"


def redact(text: str) -> str:
    """``text`` with URL user info and credential-like query values masked."""
    return _SECRET.sub(r"\1***", _USERINFO.sub(r"\1", text))


def check_root(url: str, what: str = "root") -> str:
    """A remote root or shard URL as recorded: refused with credentials in it."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise InputError(f"{what} {redact(url)} carries a user name or password: give "
                         "credentials through the storage library's environment or config "
                         "files, never in the URL (it would be written to the run's manifest)")
    return url.rstrip("/")


def under(url: str, root: str) -> str | None:
    """``url`` relative to ``root`` (both URLs) after normalising the path, or None when it
    lies elsewhere (another scheme, host, bucket or prefix, or ``..`` out of the prefix)."""
    u, r = urlsplit(url), urlsplit(root)
    if (u.scheme.lower(), u.netloc.lower()) != (r.scheme.lower(), r.netloc.lower()):
        return None
    rel = inside_prefix(u.path, r.path)
    if rel is None:
        return None
    return rel + (f"?{u.query}" if u.query else "")


def inside_prefix(path: str, prefix: str) -> str | None:
    """``path`` relative to the folder ``prefix``, lexically (percent-escapes decoded for
    the check too: a server would decode ``%2e%2e``)."""
    prefix = posixpath.normpath("/" + prefix.strip("/"))
    for candidate in {path, unquote(path)}:
        norm = posixpath.normpath("/" + candidate.lstrip("/"))
        if prefix != "/" and not norm.startswith(prefix + "/"):
            return None
    norm = posixpath.normpath("/" + path.lstrip("/"))
    return norm[len(prefix.rstrip("/")) + 1:] or None


@dataclass(frozen=True)
class Network:
    """How hard to try a remote read: ``retries`` after the first try, ``backoff``
    seconds before the first retry (doubled each time), ``timeout`` per connect / read."""

    retries: int = 3
    backoff: float = 0.5
    timeout: float = 60.0


class LocalError(Exception):
    """A local failure met during a remote read (a cache that cannot be written): the
    network's retries do not apply."""


def classify(error: BaseException, url: str) -> tuple[bool, str]:
    """(worth retrying, reason) for an exception met reading ``url``."""
    where = redact(url)
    if isinstance(error, FileNotFoundError):
        return False, f"not found: {where}"
    if isinstance(error, PermissionError):
        return False, f"access denied: {where}"
    status = getattr(error, "status", None)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 425, 429):
        return False, f"HTTP {status}: {where}"
    return True, f"{type(error).__name__}: {redact(str(error))[:200]}"


def call(fn: Callable[[], T], url: str, net: Network,
         sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, retried on transient errors; :class:`ImageError` with the reason once it
    gives up (at once for a final error such as a 404)."""
    last = ""
    for attempt in range(net.retries + 1):
        try:
            return fn()
        except (ImageError, InputError, LocalError):
            raise
        except Exception as e:
            retry, reason = classify(e, url)
            if not retry:
                raise ImageError(reason) from None
            last = reason
        if attempt < net.retries:
            sleep(net.backoff * 2 ** attempt)
    raise ImageError(f"unreachable: {redact(url)} ({net.retries + 1} tries; {last})")


class Remote:
    """The fsspec filesystem of one protocol, made on first use in each process (an
    event loop or connection pool must not cross a fork or a pickle)."""

    def __init__(self, proto: str, net: Network, root: str) -> None:
        self.proto, self.net, self.root = proto, net, root
        self._fs: Any = None
        self._pid = -1
        _check_installed(proto)

    def __getstate__(self) -> dict[str, Any]:
        return {"proto": self.proto, "net": self.net, "root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _fs=None, _pid=-1)

    def fs(self) -> Any:
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._pid = _filesystem(self.proto, self.net, self.root), os.getpid()
        return self._fs

    def cat(self, url: str) -> bytes:
        return call(lambda: self.fs().cat_file(url), url, self.net)

    def open_stream(self, url: str) -> BinaryIO:
        """A sequential reader of ``url``: one streaming GET for HTTP, large read-ahead
        ranges in order for object stores (never a seek back)."""
        if self.proto in ("http", "https"):
            return self.fs().open(url, "rb", block_size=0)
        return self.fs().open(url, "rb", block_size=8 << 20, cache_type="readahead")


def _check_installed(proto: str) -> None:
    try:
        import fsspec

        fsspec.get_filesystem_class(proto)
        if proto in PACKAGES:
            importlib.import_module(PACKAGES[proto])
    except (ImportError, ValueError) as e:
        package = PACKAGES.get(proto, f"an fsspec implementation of {proto}://")
        raise InputError(f"reading {proto}:// needs {package}, which is not installed: "
                         f"pip install {package}  (or, from a checkout: pip install -e "
                         f"\".[remote]\"); {e}") from None


def _filesystem(proto: str, net: Network, root: str) -> Any:
    import fsspec

    if proto in ("http", "https"):
        import aiohttp

        trace = aiohttp.TraceConfig()
        trace.on_request_redirect.append(_redirect_guard(root))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=net.timeout,
                                        sock_read=net.timeout)
        return fsspec.filesystem(proto, skip_instance_cache=True, client_kwargs={
            "timeout": timeout, "trace_configs": [trace]})
    if proto in ("s3", "s3a"):
        fs = fsspec.filesystem("s3", skip_instance_cache=True, config_kwargs={
            "connect_timeout": net.timeout, "read_timeout": net.timeout,
            "retries": {"max_attempts": 1}})
        fs.retries = 1  # our own loop retries, with its own backoff and reasons
        return fs
    return fsspec.filesystem(proto, skip_instance_cache=True)


def _redirect_guard(root: str) -> Callable[..., Any]:
    async def on_redirect(session: Any, ctx: Any, params: Any) -> None:
        target = urljoin(str(params.url), params.response.headers.get("Location", ""))
        if under(target, root) is None:
            raise OutsideRoot(f"redirected outside the configured root: {redact(target)}")
    return on_redirect
