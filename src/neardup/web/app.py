"""The HTTP API and the page, over one open Index (`neardup serve`; needs `pip install 'neardup[serve]'`).

    POST /api/search              an image (multipart field `file`, or the raw body) -> schemas.QUERY
    GET  /api/duplicates          ?threshold=&page=&per_page=&handled= -> schemas.DUPS_PAGE
    GET  /api/images/{id}         the indexed file itself; /thumb a cached JPEG; /info -> schemas.IMAGE
    GET  /api/compare?a=&b=       two images, their cosine and the score `dups` would link them by -> schemas.COMPARE
    GET  /api/stats               what `neardup info --json` prints
    /api/actions                  plan, apply, undo and list `dups --action` runs (web/actions_api.py;
                                  every POST refused unless `allow_actions`)
    GET  /                        the page (static/index.html, app.js, style.css; no external resources)

Safety: images are addressed by catalog id only (no path ever comes from a request), and an indexed
file is read through files.open_regular (no symlink followed, a FIFO refused without blocking) and served
only while it is still the file indexed (size, mtime and sha256): 404 when no regular file is at its path,
409 when another one is. Uploads are read into memory up to a size cap whatever Content-Length says, within
a deadline (408), parsed off the event loop (at most MAX_PARTS multipart parts, every copy counted in the
memory budget), decoded by images.load_image (pixel limit from the header, so bombs are refused before
decoding) and never written anywhere. With a token every /api call needs it (`Authorization: Bearer T`,
or the session cookie set by opening `/?token=T`: a random value, named after the port, never the token);
without one the server only answers requests addressed to a loopback name (a DNS-rebinding page cannot
reach it). Every error is JSON {"error": "..."} (schemas.ERROR), never a traceback. Routers included in
the app get the same access check (the `guard` middleware) and the same JSON errors (raise ApiError).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import mimetypes
import os
import secrets
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..files import FileCheckError, check_record, open_regular, sha256_of
from ..images import ImageError, load_image
from ..index import DEFAULT_THRESHOLD, Index, NeardupError
from ..store import Record, StoreError
from .common import COPY_PROBABILITY, MIN_DUPS_THRESHOLD, ApiError, match_scores, pair_scores
from .thumbnails import ThumbnailCache

__all__ = ["ApiError", "MIN_DUPS_THRESHOLD", "create_app", "is_loopback"]

STATIC = Path(__file__).with_name("static")
MAX_UPLOAD_BYTES = 25 * 1024 * 1024
MAX_K = 200
MAX_PER_PAGE = 200
#: Seconds a client may take to send its whole upload: a stalled one gets 408 and its memory back.
UPLOAD_TIMEOUT = 60.0
#: Multipart parts read from one upload (the file and the k and threshold fields, with room to spare).
MAX_PARTS = 8
_MAX_FIELD_BYTES = 64
#: Browser sessions remembered (one per opening of /?token=); the oldest is forgotten past it.
_MAX_SESSIONS = 1000
_READ_CHUNK = 1 << 20
_MAX_ID = 2**63 - 1
_DUPS_CACHE_SIZE = 8

log = logging.getLogger("neardup.web")


def is_loopback(host: str) -> bool:
    """Whether `host` (an address to listen on, or the name in a Host header) is loopback: 'localhost'
    or any address of 127.0.0.0/8 or ::1. The one rule both for `serve` starting without a token and for
    the server answering without one."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # any other name may resolve anywhere


def create_app(index: Index, *, token: str | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               search_workers: int | None = None, max_queued_searches: int = 1000,
               max_buffered_bytes: int | None = None, thumbs_dir: str | os.PathLike | None = None,
               upload_timeout: float = UPLOAD_TIMEOUT, allow_actions: bool = False) -> FastAPI:
    """The app serving `index`. `search_workers` threads parse and embed uploads (default: the CPU
    count): the rest of a burst waits in a queue, and only more than `max_queued_searches` waiting, or
    uploads holding more than `max_buffered_bytes` of memory together (default 20 x `max_upload_bytes`),
    get a 503. An upload not received within `upload_timeout` seconds gets a 408. `allow_actions` lets
    the page move, hard-link and delete duplicates (/api/actions, web/actions_api.py)."""
    from .actions_api import actions_router, handled_files, without_handled  # here: actions_api imports this module

    docs_assets = _docs_assets()
    app = FastAPI(title="neardup", version="1", summary="Near-duplicate image search over one index folder",
                  docs_url=None if docs_assets else "/docs", redoc_url=None)
    if docs_assets:  # Swagger UI from a local copy, so /docs works offline too
        app.mount("/docs-assets", StaticFiles(directory=docs_assets), name="docs-assets")

        @app.get("/docs", include_in_schema=False)
        def docs():
            return get_swagger_ui_html(openapi_url="/openapi.json", title="neardup API",
                                       swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                       swagger_css_url="/docs-assets/swagger-ui.css",
                                       swagger_favicon_url="/docs-assets/favicon.png")
    thumbs = ThumbnailCache(thumbs_dir or index.root / "thumbs")
    searches = ThreadPoolExecutor(max_workers=search_workers or os.cpu_count() or 1, thread_name_prefix="search")
    queued = _Counter()
    buffered = _Counter()
    max_buffered = max_buffered_bytes or 20 * max_upload_bytes
    app.state.buffered = buffered  # bytes of uploads held now (0 when none is in flight)
    duplicates = _DuplicatesCache(index)
    sessions = _Sessions()
    page = (STATIC / "index.html").read_bytes()

    # ---- errors: always JSON, never a traceback ------------------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return _error(exc.status_code, message.lower() if message == "Not Found" else message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
                    for e in exc.errors()]
        return _error(422, "; ".join(problems) or "invalid request")

    @app.exception_handler(StoreError)
    @app.exception_handler(NeardupError)
    async def index_error(request: Request, exc: Exception):
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return _error(503, f"the index cannot be read: {exc}")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        # Starlette hands the exception on to the server's log after this answer; the client sees one line
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    # ---- access: token or loopback-only ----------------------------------------------------------

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is None:
            if not is_loopback(_host_name(request.headers.get("host", ""))):
                return _error(403, "this server answers loopback addresses only (start it with --token to allow others)")
        elif request.url.path.startswith("/api/") and not _token_ok(request, token, sessions):
            return _error(401, "missing or wrong token: send 'Authorization: Bearer <token>' or open /?token=<token>")
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if not request.url.path.startswith("/docs"):  # Swagger UI's page starts it with an inline script
            response.headers.setdefault(
                "Content-Security-Policy",
                "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; frame-ancestors 'none'; "
                "base-uri 'none'; form-action 'self'")
        return response

    # ---- the page ------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def home(request: Request):
        given = request.query_params.get("token")
        if given is not None and token is not None:
            if not hmac.compare_digest(given.encode(), token.encode()):
                return _error(401, "wrong token")
            # A session cookie stands for the token from now on, and the redirect takes the token out of
            # the address bar. Cookies ignore ports, so every other service on this host receives it: it
            # holds a random value (not the token) and its name has the port (a second server's cookie
            # does not replace this one).
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(_session_cookie(request), sessions.new(), httponly=True, samesite="strict", path="/")
            return response
        return Response(page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ---- API -------------------------------------------------------------------------------------

    @app.post("/api/search", openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary"}, "k": {"type": "integer"},
            "threshold": {"type": "number"}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    }}})
    async def search(request: Request, k: int | None = Query(None, ge=1, le=MAX_K),
                     threshold: float | None = Query(None, ge=-1, le=1)):
        """Upload an image; get its k most similar indexed images (schema: neardup.schemas.QUERY).
        k and threshold come from the query string or from form fields of the same name."""
        held = _Held(buffered, max_buffered)
        job = None
        try:
            chunks = await _read_capped(request, max_upload_bytes, held, upload_timeout)
            if not queued.enter(max_queued_searches):
                raise ApiError(503, "too many searches waiting; retry in a moment")
            try:  # parsing in the pool too: a hostile multipart body never blocks the event loop
                job = searches.submit(_parse_and_search, index, request.headers.get("content-type", ""),
                                      chunks, held, k, threshold)
                name, matches, threshold, name_of_score, scores = await asyncio.wrap_future(job)
            finally:
                queued.leave()
        finally:
            if job is None or job.done():
                held.release_all()
            else:  # cancelled while the pool still parses it: the job gives its bytes back when it ends
                job.add_done_callback(lambda _: held.release_all())
        return {"threshold": threshold, "score_name": name_of_score, "dups_threshold": DEFAULT_THRESHOLD,
                "results": [{"query": name, "matches": [
                    {"path": m.path, "score": round(m.score, 6), "id": m.id, "dups_score": round(s, 6),
                     "copy": bool(s >= DEFAULT_THRESHOLD)} for m, s in zip(matches, scores)]}]}

    @app.get("/api/duplicates")
    def list_duplicates(threshold: float = Query(DEFAULT_THRESHOLD, ge=MIN_DUPS_THRESHOLD, le=1.0),
                        page: int = Query(1, ge=1, le=10**9), per_page: int = Query(50, ge=1, le=MAX_PER_PAGE),
                        handled: str = Query("show", pattern="^(show|hide)$")):
        """One page of duplicate groups, largest first (schema: neardup.schemas.DUPS_PAGE). Groups are
        computed once per index version and threshold, then served from memory. `handled=hide` leaves out
        the files an applied run is done with (moved into its folder, made a hard link to their survivor),
        as the next plan does, and the groups left with fewer than two files."""
        threshold = round(threshold, 4)
        groups = duplicates.get(threshold)
        hidden = 0
        if handled == "hide":
            done = handled_files(index)
            hidden = sum(p in done for g in groups for p in g.files)
            groups = without_handled(index, groups)
        pages = math.ceil(len(groups) / per_page)
        start = (page - 1) * per_page
        shown = []
        for number, group in enumerate(groups[start:start + per_page], start + 1):
            images = [_image_info(index.image(i)) for i in group.ids]
            shown.append({"number": number, "min_score": round(group.min_score, 6),
                          "max_score": round(group.max_score, 6), "min_cosine": round(group.min_cosine, 6),
                          "max_cosine": round(group.max_cosine, 6), "images": [i for i in images if i]})
        return {"threshold": threshold, "page": page, "per_page": per_page, "pages": pages,
                "total_groups": len(groups), "total_files": sum(len(g.ids) for g in groups), "groups": shown,
                "score_name": COPY_PROBABILITY, "max_threshold": 1.0, "handled_hidden": hidden}

    @app.get("/api/images/{image_id}")
    def image_file(image_id: int = PathParam(ge=1, le=_MAX_ID)):
        """The indexed file itself, by catalog id, while it is still the file indexed (else 404 or 409)."""
        record = _indexed(index, image_id)
        stream = _open_indexed(record)
        try:
            if record.sha256:  # the whole content is checked before the first byte leaves
                if sha256_of(stream) != record.sha256:
                    raise ApiError(409, _changed(record, "its content differs"))
                stream.seek(0)
        except OSError as exc:
            stream.close()
            raise ApiError(404, f"image {image_id} cannot be read now: {exc.strerror or exc}") from None
        except BaseException:
            stream.close()
            raise
        media_type = mimetypes.guess_type(record.path)[0] or "application/octet-stream"
        if not media_type.startswith("image/") or media_type == "image/svg+xml":
            media_type = "application/octet-stream"
        return StreamingResponse(_chunks_of(stream), media_type=media_type, headers={
            "Cache-Control": "private, max-age=60", "Content-Length": str(record.size)})

    @app.get("/api/images/{image_id}/thumb")
    def image_thumb(image_id: int = PathParam(ge=1, le=_MAX_ID)):
        """A JPEG thumbnail (at most 256 px a side) of the file indexed, cached in the index folder."""
        record = _indexed(index, image_id)
        with _open_indexed(record) as stream:
            try:
                data = thumbs.get(record, stream)
            except FileCheckError as exc:
                raise ApiError(409, _changed(record, str(exc))) from None
            except ImageError as exc:
                raise ApiError(404, f"image {image_id} cannot be read now: {exc.reason}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/images/{image_id}/info")
    def image_info(image_id: int = PathParam(ge=1, le=_MAX_ID)):
        """Path, dimensions and file size of one image (schema: neardup.schemas.IMAGE)."""
        return _image_info(_indexed(index, image_id))

    @app.get("/api/compare")
    def compare(a: int = Query(ge=1, le=_MAX_ID), b: int = Query(ge=1, le=_MAX_ID)):
        """Two images side by side: their details, the cosine of their vectors and the copy probability
        `dups` would link them by (schema: COMPARE)."""
        records = [_indexed(index, a), _indexed(index, b)]
        scores = pair_scores(index, a, b)
        if scores is None:
            raise ApiError(404, "one of the images left the index")
        return {"score": round(scores["score"], 6), "cosine": round(scores["cosine"], 6),
                "score_name": scores["score_name"], "dups_threshold": DEFAULT_THRESHOLD,
                "images": [_image_info(r) for r in records]}

    @app.get("/api/stats")
    def stats():
        """What `neardup info --json` prints: image counts, model, storage."""
        return index.stats()

    app.include_router(actions_router(index, enabled=allow_actions))
    return app


# ---- helpers -------------------------------------------------------------------------------------

def _docs_assets() -> Path | None:
    """Swagger UI's script and style as shipped by the fastapi-offline wheel (else FastAPI's CDN links)."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, **({"field": field} if field else {})}, status_code=status)


def _host_name(header: str) -> str:
    """The name in a Host header, without the port ('[::1]:8000' -> '[::1]')."""
    header = header.strip().lower()
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _session_cookie(request: Request) -> str:
    """The session cookie's name for the port this server listens on (cookies ignore ports)."""
    server = request.scope.get("server") or ("", None)
    return f"neardup_session_{server[1]}" if server[1] else "neardup_session"


def _token_ok(request: Request, token: str, sessions: _Sessions) -> bool:
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return hmac.compare_digest(header[7:].strip().encode(), token.encode())
    return sessions.known(request.cookies.get(_session_cookie(request), ""))


def _open_indexed(record: Record) -> BinaryIO:
    """The file of `record`, opened without following a symlink or blocking on a FIFO, and checked against
    the catalog's size and mtime. ApiError 404 when no regular file is at the path (deleted, or swapped for
    a symlink, a FIFO, a folder), 409 when the regular file there is not the one indexed."""
    try:
        stream = open_regular(record.path)
    except FileCheckError as exc:
        raise ApiError(404, f"image {record.id} cannot be read now: {exc}") from None
    try:
        check_record(stream, size=record.size, mtime_ns=record.mtime_ns)
    except FileCheckError as exc:
        stream.close()
        raise ApiError(409, _changed(record, str(exc))) from None
    return stream


def _changed(record: Record, reason: str) -> str:
    return f"image {record.id} is not the file indexed any more ({reason}); index its folder again"


def _chunks_of(stream: BinaryIO):
    with stream:
        while chunk := stream.read(_READ_CHUNK):
            yield chunk


async def _read_capped(request: Request, limit: int, held: _Held, deadline: float) -> list[bytes]:
    """The request body's chunks, refused as soon as it passes `limit` bytes (Content-Length is not
    trusted) or takes longer than `deadline` seconds (408: a stalled client would hold its memory, and
    uvicorn sets no deadline on bodies); `held` accounts for (or refuses) each chunk before it is kept."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + 64 * 1024:  # multipart framing on top of the file
        raise ApiError(413, f"upload too large: at most {limit // 1_000_000} MB")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(deadline):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit + 64 * 1024:
                    raise ApiError(413, f"upload too large: at most {limit // 1_000_000} MB")
                held.take(len(chunk))
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"upload not received within {deadline:g} s") from None
    return chunks


def _parse_and_search(index: Index, content_type: str, chunks: list[bytes], held: _Held, k: int | None,
                      threshold: float | None):
    """(upload name, matches, threshold) of one upload; runs in the search pool."""
    name, data, fields = _upload(content_type, chunks, held)
    k = _number(fields["k"], int, "k", 1, MAX_K) if "k" in fields else (k or 10)
    if "threshold" in fields:
        threshold = _number(fields["threshold"], float, "threshold", -1, 1)
    matches, name_of_score, scores = _search(index, data, k, threshold)
    return name, matches, threshold, name_of_score, scores


def _upload(content_type: str, chunks: list[bytes], held: _Held) -> tuple[str, bytes, dict[str, str]]:
    """(file name, image bytes, other form fields) of a multipart form or of a raw image body, from the
    body's chunks. Each chunk is let go (and its count returned) once parsed, and every parsed copy is
    counted first, so `held` is what this request holds. A form may have MAX_PARTS parts; only the first
    `file` (or `image`) part and the `k` and `threshold` fields are kept, every other part is skipped."""
    if not content_type.lower().startswith("multipart/form-data"):
        body = _joined(chunks, held)
        if not body:
            raise ApiError(400, "no image: send multipart/form-data with a 'file' field, or the image as the body")
        return "upload", body, {}
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart/form-data without a boundary")
    file_pieces: list[bytes] = []
    fields: dict[str, str] = {}
    part: dict = {}  # the part being parsed
    parts = 0
    upload_name = None

    def on_part_begin():
        nonlocal parts
        parts += 1
        if parts > MAX_PARTS:
            raise ApiError(400, f"too many parts in the form: at most {MAX_PARTS}")
        part.update(field=b"", header=b"", headers={}, keep=None, data=b"")

    def on_header_field(data, start, end):  # python-multipart caps a part's headers' number and size
        part["field"] += data[start:end]

    def on_header_value(data, start, end):
        part["header"] += data[start:end]

    def on_header_end():
        part["headers"][part["field"].lower()] = part["header"]
        part["field"] = part["header"] = b""

    def on_headers_finished():
        nonlocal upload_name
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        field = disposition.get(b"name", b"").decode("utf-8", "replace")
        if field in ("file", "image") and upload_name is None:
            filename = disposition.get(b"filename", b"upload").decode("utf-8", "replace")
            upload_name = os.path.basename(filename) or "upload"
            part["keep"] = "file"
        elif field in ("k", "threshold"):
            part["keep"] = field

    def on_part_data(data, start, end):
        if part["keep"] == "file":
            held.take(end - start)
            file_pieces.append(data[start:end])
        elif part["keep"]:
            part["data"] += data[start:end]
            if len(part["data"]) > _MAX_FIELD_BYTES:
                raise ApiError(422, f"{part['keep']}: not a number: too long")

    def on_part_end():
        if part["keep"] in ("k", "threshold"):
            fields[part["keep"]] = part["data"].decode("utf-8", "replace").strip()

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        for i, chunk in enumerate(chunks):
            parser.write(chunk)
            chunks[i] = b""
            held.give(len(chunk))
        parser.finalize()
    except (MultipartParseError, ValueError) as exc:
        raise ApiError(400, f"malformed multipart body: {exc}") from None
    data = _joined(file_pieces, held)
    if not data:
        raise ApiError(400, "no image: the form needs a non-empty 'file' field")
    return upload_name, data, fields


def _joined(pieces: list[bytes], held: _Held) -> bytes:
    """The pieces as one bytes object, counted before it is made; the pieces are let go."""
    if len(pieces) == 1:
        return pieces.pop()
    size = sum(len(p) for p in pieces)
    held.take(size)
    data = b"".join(pieces)
    pieces.clear()
    held.give(size)
    return data


def _number(text: str, kind, name: str, low: float, high: float):
    try:
        value = kind(text)
    except ValueError:
        raise ApiError(422, f"{name}: not a number: {text[:40]!r}") from None
    if math.isnan(value) or not low <= value <= high:
        raise ApiError(422, f"{name}: must be between {low} and {high}")
    return value


def _search(index: Index, data: bytes, k: int, threshold: float | None):
    """(matches, the name of the score `dups` links by, each match's copy probability)."""
    try:
        decoded = load_image(data, min_side=index.embedder.input_size)
    except ImageError as exc:
        raise ApiError(422, f"cannot read the uploaded image: {exc.reason}") from None
    matches = index.query(decoded.image, k=k, threshold=threshold)
    name, scores = match_scores(index, lambda: index.embed(decoded.image), matches)
    return matches, name, scores


def _indexed(index: Index, image_id: int) -> Record:
    record = index.image(image_id)
    if record is None or record.status != "indexed":
        raise ApiError(404, f"no indexed image with id {image_id}")
    return record


def _image_info(record: Record | None) -> dict | None:
    if record is None:
        return None
    return {"id": record.id, "path": record.path, "width": record.width, "height": record.height, "bytes": record.size}


class _Counter:
    """A thread-safe running total with a ceiling (searches waiting, bytes of uploads held)."""

    def __init__(self):
        self._value, self._lock = 0, threading.Lock()

    def enter(self, limit: int, amount: int = 1) -> bool:
        with self._lock:
            if self._value + amount > limit:
                return False
            self._value += amount
            return True

    def leave(self, amount: int = 1) -> None:
        with self._lock:
            self._value -= amount

    @property
    def value(self) -> int:
        return self._value


class _Held:
    """The bytes one upload holds, counted in the server's shared budget (a _Counter): `take` before
    keeping a copy (503 when the budget is spent), `give` after letting one go, `release_all` at the end."""

    def __init__(self, budget: _Counter, limit: int):
        self._budget, self._limit, self.size = budget, limit, 0

    def take(self, size: int) -> None:
        if not self._budget.enter(self._limit, size):
            raise ApiError(503, "too many uploads in progress; retry in a moment")
        self.size += size

    def give(self, size: int) -> None:
        self._budget.leave(size)
        self.size -= size

    def release_all(self) -> None:
        self.give(self.size)


class _Sessions:
    """Random session values handed to browsers that opened /?token=T (the cookie never holds the token);
    the newest _MAX_SESSIONS are kept. They live as long as the server: after a restart, open the link again."""

    def __init__(self):
        self._values: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def new(self) -> str:
        value = secrets.token_urlsafe(32)
        with self._lock:
            self._values[value] = None
            while len(self._values) > _MAX_SESSIONS:
                self._values.popitem(last=False)
        return value

    def known(self, value: str) -> bool:
        with self._lock:
            return bool(value) and value in self._values


class _DuplicatesCache:
    """Groups per (index version, threshold), computed once: one computation at a time, the last few
    thresholds kept, so paging through thousands of groups and moving the slider back stay instant."""

    def __init__(self, index: Index):
        self._index = index
        self._lock = threading.Lock()
        self._cache: OrderedDict = OrderedDict()

    def get(self, threshold: float):
        with self._lock:
            key = (self._index.version(), threshold)
            if key not in self._cache:
                self._cache[key] = self._index.duplicates(threshold)
                while len(self._cache) > _DUPS_CACHE_SIZE:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
            return self._cache[key]
