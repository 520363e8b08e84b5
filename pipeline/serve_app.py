"""The HTTP layer of ``serve``: FastAPI routes over :class:`pipeline.serve.Service`.

Search answers are :meth:`pipeline.search.SearchResult.to_dict`, the same JSON as
``python -m pipeline search --json``.  Errors are ``{"detail": "one sentence"}`` with
400 (bad query or upload), 403 (refused), 404 (no such row), 409 (the run lacks an
index), 413 (upload too large) or 422 (malformed parameter).  Only the project's user
errors (:class:`~embeddings.errors.UserError`) become these; anything else is a bug: it
is logged with its traceback and answered 500 with no internal detail.  The page and the API docs
(Swagger UI from the ``fastapi-offline`` package) load nothing from outside the server.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import fastapi_offline
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware.trustedhost import TrustedHostMiddleware

from embeddings.errors import FormatError, InputError, MissingError, UserError

from .search import SearchResult
from .serve import NotReady, Refused, Service, TooLarge

log = logging.getLogger(__name__)
STATIC = Path(str(resources.files("pipeline") / "static"))
DOCS_STATIC = Path(fastapi_offline.__file__).parent / "static"
FORM_OVERHEAD = 16 * 1024  # multipart boundaries and part headers around the file
DRAIN_LIMIT = 64 * 2**20  # read (and drop) this much of an oversized upload, then hang up
PAGE_CSP = ("default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")
STATUS = ((TooLarge, 413), (Refused, 403), (MissingError, 404), (NotReady, 409),
          (FormatError, 409), (UserError, 400))
INTERNAL = "internal error: the server logged it; please report it"

Modality = Annotated[str, Query(pattern="^(image|text)$",
                                description="what to return: image rows or caption rows")]
K = Annotated[int, Query(ge=1, description="number of hits")]
Split = Annotated[str | None, Query(max_length=200, description="only rows of this split")]
Label = Annotated[str | None, Query(max_length=200, description="only rows with this label")]
Column = Annotated[str | None, Query(max_length=200, description="index to search (default: "
                                     "picked from modality and query)")]
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "query image"}}}}}}}
Via = Annotated[str | None, Query(max_length=200, description="adapter (RUN/align/NAME) to "
                                  "embed the query through, e.g. a multilingual encoder "
                                  "mapped into CLIP's space")]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(service: Service, host: str = "127.0.0.1") -> FastAPI:
    """The app for one run; ``host`` is the bind address (it decides the allowed Host
    headers, which keeps DNS-rebinding pages from reading a loopback server)."""
    app = FastAPI(title="multimodal-embeddings search",
                  description=f"Search the run `{service.run}`: text, image and "
                  "more-like-this queries; thumbnails by row id.",
                  docs_url=None, redoc_url=None)
    hosts = ["*"] if _is_wildcard(host) else ["127.0.0.1", "localhost", "[::1]", host]
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-static", StaticFiles(directory=DOCS_STATIC), name="docs-static")
    _errors(app)

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        try:
            response = await call_next(request)
        except Exception as exc:  # a bug, not the user's: logged here, no detail sent
            log.error("internal error on %s %s", request.method, request.url.path,
                      exc_info=(type(exc), exc, exc.__traceback__))
            response = JSONResponse({"detail": INTERNAL}, status_code=500)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        return response

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                             "Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API",
            swagger_js_url="/docs-static/swagger-ui-bundle.js",
            swagger_css_url="/docs-static/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
            swagger_ui_parameters={"validatorUrl": None})

    @app.get("/api/health", tags=["run"])
    def health() -> dict[str, Any]:
        """The run, its embedding columns (indexed or not, and why not), its models, the
        splits and labels to filter by, and the server's limits."""
        return service.health()

    @app.get("/api/search", tags=["search"], response_model=SearchResult)
    def search_text(q: Annotated[str, Query(description="query text")],
                    modality: Modality = "image", k: K = 10, split: Split = None,
                    label: Label = None, column: Column = None,
                    via: Via = None) -> dict[str, Any]:
        """Text query: the rows nearest to ``q``, as ``search --json``; with ``via``,
        through that adapter (``/api/health`` lists them)."""
        return service.search_text(q, modality, k, split, label, column, via).to_dict()

    @app.post("/api/search/image", tags=["search"], response_model=SearchResult,
              openapi_extra=UPLOAD_BODY)
    async def search_image(request: Request, modality: Modality = "image", k: K = 10,
                           split: Split = None, label: Label = None,
                           column: Column = None) -> dict[str, Any]:
        """Image query: multipart upload with one part named ``file``; capped in bytes
        and pixels (see ``/api/health`` limits)."""
        data, name = await _upload(request, service.cfg.max_upload_bytes)
        result = await run_in_threadpool(service.search_upload, data, name, modality, k,
                                         split, label, column)
        return result.to_dict()

    @app.get("/api/similar", tags=["search"], response_model=SearchResult)
    def similar(id: Annotated[str, Query(max_length=1000, description="row id (a hit's id)")],
                source: Annotated[str, Query(pattern="^(image|text)$", description=(
                    "image: `id` is an image row; text: a caption row"))] = "image",
                modality: Modality = "image", k: K = 10, split: Split = None,
                label: Label = None) -> dict[str, Any]:
        """More like this: the stored vector of row ``id`` is the query."""
        return service.similar(id, source, modality, k, split, label).to_dict()

    @app.get("/api/thumb", tags=["images"], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}})
    def thumb(id: Annotated[str, Query(max_length=1000, description="image row id")]
              ) -> Response:
        """JPEG thumbnail of image row ``id`` (made on first request, then cached)."""
        return Response(service.thumbnail(id), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    return app


def _is_wildcard(host: str) -> bool:
    """True for wildcard binds (0.0.0.0, ::), which accept any Host header."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _errors(app: FastAPI) -> None:
    async def user_error(request: Request, exc: Exception) -> JSONResponse:
        status = next(code for kind, code in STATUS if isinstance(exc, kind))
        return JSONResponse({"detail": str(exc)}, status_code=status)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        parts = [f"{'.'.join(str(x) for x in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
                 for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    app.add_exception_handler(UserError, user_error)  # InputError, FormatError, ...
    app.add_exception_handler(RequestValidationError, invalid)


async def _upload(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """The bytes and name of the multipart part ``file``, held in memory (no spooling to a
    temporary directory) and refused past ``max_bytes``."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InputError("send the image as multipart/form-data with a part named 'file'")
    limit = max_bytes + FORM_OVERHEAD
    body, seen = bytearray(), 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen <= limit:
            body += chunk
        elif seen > DRAIN_LIMIT:
            break
    if seen > limit:
        raise TooLarge(f"upload too large: more than {max_bytes / 2**20:.1f} MiB "
                       f"(limit {max_bytes} bytes)")

    async def once() -> AsyncIterator[bytes]:
        yield bytes(body)

    parser = MultiPartParser(request.headers, once(), max_files=1, max_fields=8,
                             max_part_size=4096)
    parser.spool_max_size = limit + 1  # keep the file part in memory
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise InputError(f"malformed upload: {e.message}") from None
    part = form.get("file")
    if not isinstance(part, UploadFile):
        raise InputError("no image in the upload: send a part named 'file'")
    data = await part.read()
    return data, part.filename or "upload"
