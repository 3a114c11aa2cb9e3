"""The `server` room: a JSON API and a static web page over one index, for a person's browser on this machine.

Safety comes first because a browser will talk to it: files are served only by indexed image id, never by a path taken
from the request; the query language's file-path parts are refused (only `#id` images); `under` must lie inside an
indexed folder; uploads are capped and read from a temp file outside every photo folder that is deleted at once; the
server binds to loopback unless told otherwise, and while it does, it answers only requests addressed to a loopback name
(so a web page cannot reach it by DNS rebinding). The index's SQLite connection is one per process, so every call into
the index goes through one lock. Thumbnails are made from the EXIF-rotated image, on first request, and cached on disk
inside the index directory under a name that changes when the photo does, so they can be cached by browsers for good.
"""
from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import socket
import tempfile
import threading
import time
import webbrowser
from io import BytesIO
from pathlib import Path
from typing import Annotated, Any, Callable

import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi import Query as QueryParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__, media
from . import index as index_api
from .errors import BadInput, ClipsearchError, IndexBusy, IndexMissing, ModelError, ModelMismatch
from .query import Filters, check_threshold, image_vector, search_captions, search_images
from .query_syntax import Part, Query

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_RESULTS = 2000          # offset + k: deeper than any person scrolls, cheap for FAISS
MAX_PAGE = 200
THUMBNAILS_DIR = "thumbnails"
SIZES = {"thumbnail": 400, "preview": 1600}  # longest side in pixels
THUMBNAIL_RECIPE = "1"      # bump when the way thumbnails are made changes: every cached one is then made again
MAX_ID = 2 ** 63 - 1
WEB_DIR = Path(__file__).with_name("web")
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/style.css": ("style.css", "text/css; charset=utf-8")}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
                               "style-src 'self'; connect-src 'self'; frame-ancestors 'none'",
}
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


# ------------------------------------------------------------------------------------------------- response models
class ImageInfo(BaseModel):
    """An indexed image; `score` is set when it is a search result (cosine similarity to the query)."""

    id: int
    path: str
    name: str
    score: float | None = None
    width: int | None = None
    height: int | None = None
    taken: str | None = None
    size: int | None = None
    modified: str | None = None
    format: str | None = None
    thumbnail: str
    preview: str
    file: str


class CaptionInfo(BaseModel):
    """A caption; `image_id` is the indexed image it describes, when it is linked to one."""

    id: int
    text: str
    collection: str
    score: float | None = None
    image: str | None = None
    image_id: int | None = None


class ImageResults(BaseModel):
    hits: list[ImageInfo]
    offset: int
    more: bool  # whether asking for the next page can return more


class CaptionResults(BaseModel):
    hits: list[CaptionInfo]
    available: bool  # whether the index holds captions at all


class ImageDetail(ImageInfo):
    captions: list[CaptionInfo]  # captions linked to this image


class UploadResults(BaseModel):
    width: int
    height: int
    similar: list[ImageInfo]
    captions: list[CaptionInfo]


# ----------------------------------------------------------------------------------------------------------- helpers
def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the server to this machine."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class NotFound(ClipsearchError):
    """An id or route that does not exist (HTTP 404)."""


def _status(exc: ClipsearchError) -> int:
    if isinstance(exc, (NotFound, IndexMissing)):
        return 404
    if isinstance(exc, BadInput):
        return 400
    if isinstance(exc, (IndexBusy, ModelError)):
        return 503
    if isinstance(exc, ModelMismatch):
        return 409
    return 500


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def checked_query(expression: str | Query, images: list[int], negatives: list[str]) -> Query:
    """The query as the CLI reads it, minus file paths: over HTTP an image part must be an indexed `#id`, so a request
    can never make the server open a file it names."""
    parsed = Query.build(expression, images, negatives)
    for part in parsed.parts:
        if part.kind == "image" and not isinstance(part.value, int):
            raise BadInput(f"image parts must be indexed images written #ID (e.g. #42), not file paths: {part.value!r}")
    return parsed


UPLOADED = Part("upload", "the uploaded image", 1.0)  # stands for the request body among a query's parts


def upload_query(expression: str, negatives: list[str]) -> Query:
    """The uploaded image as the first part (weight 1) of a query, like the CLI's `search --image FILE TEXT --not X`;
    the other parts are checked like any query's."""
    head = Query.parse(expression).parts if expression.strip() else ()
    return checked_query(Query((UPLOADED, *head)), [], negatives)


def mixed_vector(index: index_api.Index, query: Query, uploaded: np.ndarray) -> tuple[np.ndarray, set[int]]:
    """The weighted sum of the query's parts, `UPLOADED` being `uploaded`, renormalised (as query.query_vector sums
    a query that names files); and the indexed images it adds, to be left out of the results."""
    texts = query.texts
    encoded = iter(index.encode_texts(texts)) if texts else iter(())
    total = np.zeros_like(uploaded, dtype=np.float32)
    own: set[int] = set()
    for part in query.parts:
        if part.kind == "upload":
            vector = uploaded
        elif part.kind == "text":
            vector = next(encoded)
        else:
            vector, image_id = image_vector(index.store, part.value, lambda: index.model)
            if image_id is not None and part.weight > 0:
                own.add(image_id)
        total += part.weight * vector
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise BadInput("the parts of the query cancel each other out")
    return (total / norm).astype(np.float32), own


def _version(row: dict) -> str:
    """Changes whenever the file behind an id does (content, size, time) or the thumbnail recipe does."""
    key = f"{row['fingerprint']}:{row['size']}:{row['mtime_ns']}:{THUMBNAIL_RECIPE}"
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def _image_info(row: dict, score: float | None = None) -> dict:
    image_id, version = row["id"], _version(row)
    return {
        "id": image_id, "path": row["path"], "name": os.path.basename(row["path"]), "score": score,
        "width": row["width"], "height": row["height"], "taken": row["taken"], "size": row["size"],
        "modified": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(row["mtime_ns"] / 1e9)),
        "format": row["format"],
        "thumbnail": f"/api/images/{image_id}/thumbnail?v={version}",
        "preview": f"/api/images/{image_id}/preview?v={version}",
        "file": f"/api/images/{image_id}/file",
    }


def _host_name(header: str) -> str:
    """'127.0.0.1:8765' -> '127.0.0.1', '[::1]:8765' -> '::1', 'Example.COM' -> 'example.com'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


class Thumbnails:
    """EXIF-rotated JPEG renderings of indexed images, made on first request and kept on disk by (id, version)."""

    def __init__(self, folder: Path, workers: int | None = None) -> None:
        self.folder = folder
        self._making = threading.BoundedSemaphore(workers or max(2, os.cpu_count() or 2))  # decodes are big

    def path(self, kind: str, image_id: int, version: str) -> Path:
        return self.folder / kind / f"{image_id // 1000:05d}" / f"{image_id}-{version}.jpg"

    def get(self, kind: str, row: dict) -> bytes:
        """The cached rendering, else a new one (cached when the index directory is writable). Raises MediaError."""
        target = self.path(kind, row["id"], _version(row))
        try:
            return target.read_bytes()
        except OSError:
            pass
        with self._making:
            data = self.make(row["path"], SIZES[kind], row["width"], row["height"])
        self._store(target, data)
        return data

    @staticmethod
    def make(path: str, side: int, width: int | None = None, height: int | None = None) -> bytes:
        """A JPEG at most `side` px on its longest side. JPEGs are draft-decoded (DCT-scaled) to just above the
        rendering's own size, known from the indexed (upright) width and height: a 3:2 photo's 400 px thumbnail then
        decodes at 1/8 scale, not at the 1/4 a square box would need."""
        box = (side, side)  # (height, width), upright
        if width and height:
            box = (side * height / max(width, height), side * width / max(width, height))
        img = media.open_image(path, min_size=tuple(math.ceil(n / media.DRAFT_FACTOR) for n in box))
        img.thumbnail((side, side), Image.Resampling.LANCZOS)
        out = BytesIO()
        img.save(out, "JPEG", quality=85)
        return out.getvalue()

    def _store(self, target: Path, data: bytes) -> None:
        """Write atomically and drop the image's older versions; a read-only index just goes without a cache."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            temp = target.with_name(f".{target.name}.{threading.get_ident()}.tmp")
            temp.write_bytes(data)
            os.replace(temp, target)
            image_id = target.name.split("-", 1)[0]
            for old in target.parent.glob(f"{image_id}-*.jpg"):
                if old != target:
                    old.unlink(missing_ok=True)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------------------------- app
K = Annotated[int, QueryParam(ge=1, le=MAX_PAGE, description="Results per page.")]
OFFSET = Annotated[int, QueryParam(ge=0, lt=MAX_RESULTS, description="Results to skip (paging).")]
IMAGE_ID = Annotated[int, PathParam(description="An indexed image's id.")]
UNDER = Annotated[list[str], QueryParam(description="Only images under this indexed folder (repeatable: any).")]
AFTER = Annotated[str | None, QueryParam(description="Taken on or after: YYYY, YYYY-MM, YYYY-MM-DD[THH:MM[:SS]].")]
BEFORE = Annotated[str | None, QueryParam(description="Taken on or before (inclusive), same forms as `after`.")]
TYPES = Annotated[list[str], QueryParam(alias="type", description="Image types, e.g. jpg,png (repeatable).")]
THRESHOLD = Annotated[float | None, QueryParam(description="Drop results scoring below this (-1..1).")]
NOT = Annotated[list[str], QueryParam(alias="not", description="Push results away from a text or #ID (repeatable).")]
IMAGES = Annotated[list[int], QueryParam(alias="image", description="Add an indexed image (id) to the query.")]
COLLECTIONS = Annotated[list[str], QueryParam(alias="collection", description="Only captions from this collection.")]


def create_app(index: index_api.Index, *, allowed_hosts: frozenset[str] | None = LOOPBACK_NAMES) -> FastAPI:
    """The web app over an open index. Requests whose Host header names another host are refused (DNS rebinding);
    `allowed_hosts=None` accepts any (a server deliberately exposed on the network)."""
    lock = threading.RLock()
    thumbs = Thumbnails(index.path / THUMBNAILS_DIR)

    def reject_unknown_parameters(request: Request) -> None:
        """A misspelt filter must not silently widen a search, and `?path=` must never look accepted. (The page itself
        keeps its state in `/?q=...`, read by its script.)"""
        dependant = getattr(request.scope.get("route"), "dependant", None)
        if dependant is None or not request.url.path.startswith("/api/"):
            return
        known = {param.alias for param in dependant.query_params}
        for name in request.query_params:
            if name not in known:
                raise BadInput(f"unknown parameter {name!r}" + (f" (known: {', '.join(sorted(known))})" if known
                                                                  else ""))

    app = FastAPI(title="clipsearch", version=__version__, docs_url=None, redoc_url=None,
                  dependencies=[Depends(reject_unknown_parameters)],
                  description="Search one clipsearch index by text, image and mixed queries. Images are served by "
                              "id only. Errors are JSON objects {\"error\": \"one line\"}.")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if allowed_hosts is not None and _host_name(request.headers.get("host", "")) not in allowed_hosts:
            return _error(400, "this server answers only requests addressed to this machine (localhost, 127.0.0.1)")
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(ClipsearchError)
    async def library_error(request: Request, exc: ClipsearchError) -> JSONResponse:
        return _error(_status(exc), str(exc))

    @app.exception_handler(media.MediaError)
    async def media_error(request: Request, exc: media.MediaError) -> JSONResponse:
        return _error(404, f"image file not available: {exc}")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = first.get("loc", ())
        name = where[-1] if len(where) > 1 else "request"
        return _error(400, f"bad parameter {name!r}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    def ok_row(image_id: int) -> dict:
        """The row of an indexed (readable) image, or 404. Call with the lock held."""
        row = index.store.rows([image_id]).get(image_id) if 0 < image_id <= MAX_ID else None
        if row is None or row["status"] != "ok":
            raise NotFound(f"no indexed image has id {image_id}")
        return row

    def image_hits(hits: list) -> list[dict]:
        rows = index.store.rows([hit.id for hit in hits])
        return [_image_info(rows[hit.id], hit.score) for hit in hits if hit.id in rows]

    def folders(under: list[str]) -> list[str]:
        """Folder filters, kept to the indexed folders: a request may narrow a search, never probe the disk."""
        roots = [row["path"].rstrip("/") for row in index.store.roots()]
        checked = []
        for folder in under:
            path = os.path.normpath(folder) if folder and "\x00" not in folder else ""
            if not os.path.isabs(path) or not any(path == r or path.startswith(r + "/") for r in roots):
                raise BadInput(f"folder {folder!r} is not inside an indexed folder")
            checked.append(path)
        return checked

    def page(search: Callable[[int], list], offset: int, k: int) -> dict:
        if offset + k > MAX_RESULTS:
            raise BadInput(f"offset + k must be at most {MAX_RESULTS}")
        hits = search(offset + k)
        return {"hits": image_hits(hits[offset:]), "offset": offset,
                "more": len(hits) == offset + k and offset + k < MAX_RESULTS}

    def filters(under: list[str], after: str | None, before: str | None, types: list[str],
                threshold: float | None) -> dict:
        return {"under": folders(under), "after": after, "before": before, "types": types, "threshold": threshold}

    # ---------------------------------------------------------------------------------------------------- the page
    def page_file(name: str, media_type: str) -> Response:
        return FileResponse(WEB_DIR / name, media_type=media_type, headers={"Cache-Control": "no-cache"})

    for route, (name, media_type) in PAGE_FILES.items():
        app.add_api_route(route, lambda name=name, media_type=media_type: page_file(name, media_type),
                          methods=["GET"], include_in_schema=False)

    # ----------------------------------------------------------------------------------------------------- the API
    @app.get("/api/info", summary="What the index holds")
    def info() -> dict[str, Any]:
        """Counts, model, caption collections, indexed folders, last run, and the server's limits."""
        with lock:
            data = index.info()
        return {**data, "limits": {"max_upload_bytes": MAX_UPLOAD_BYTES, "max_page": MAX_PAGE,
                                   "max_results": MAX_RESULTS}}

    @app.get("/api/search", response_model=ImageResults, summary="Images nearest to a query")
    def search(q: str = "", image: IMAGES = [], not_: NOT = [], under: UNDER = [], after: AFTER = None,
               before: BEFORE = None, types: TYPES = [], threshold: THRESHOLD = None, k: K = 48,
               offset: OFFSET = 0) -> dict:
        """`q` is a text or the query language (`2*dog + #42 - "cat"`); images are indexed ids (`#42` or `image=42`),
        never file paths. Filters apply inside the vector search; images named in the query are left out."""
        with lock:
            parsed = checked_query(q, image, not_)
            chosen = filters(under, after, before, types, threshold)
            return page(lambda n: index.search(parsed, n, **chosen), offset, k)

    @app.get("/api/images/{image_id}", response_model=ImageDetail, summary="One indexed image")
    def image_detail(image_id: IMAGE_ID) -> dict:
        """Metadata of an indexed image, with the captions linked to it."""
        with lock:
            row = ok_row(image_id)
            return {**_image_info(row), "captions": index.captions_of(image_id)}

    @app.get("/api/images/{image_id}/similar", response_model=ImageResults, summary="More like this")
    def similar(image_id: IMAGE_ID, under: UNDER = [], after: AFTER = None, before: BEFORE = None,
                types: TYPES = [], threshold: THRESHOLD = None, k: K = 48, offset: OFFSET = 0) -> dict:
        """Images nearest to an indexed image, the image itself left out; same filters as /api/search."""
        with lock:
            ok_row(image_id)
            chosen = filters(under, after, before, types, threshold)
            return page(lambda n: index.similar(image_id, n, **chosen), offset, k)

    @app.get("/api/images/{image_id}/captions", response_model=CaptionResults, summary="Captions nearest to an image")
    def image_captions(image_id: IMAGE_ID, collection: COLLECTIONS = [], threshold: THRESHOLD = None,
                       k: K = 10) -> dict:
        """The captions (of any image, or none) whose vectors are nearest to this image's."""
        with lock:
            ok_row(image_id)
            if not index.store.caption_count():
                return {"hits": [], "available": False}
            hits = index.search_captions("", k, image=image_id, collection=collection, threshold=threshold)
            return {"hits": [hit.to_dict() for hit in hits], "available": True}

    @app.get("/api/captions", response_model=CaptionResults, summary="Captions nearest to a query")
    def captions(q: str = "", image: IMAGES = [], not_: NOT = [], collection: COLLECTIONS = [],
                 threshold: THRESHOLD = None, k: K = 10) -> dict:
        """Same query language as /api/search, answered with captions instead of images."""
        with lock:
            parsed = checked_query(q, image, not_)
            if not index.store.caption_count():
                return {"hits": [], "available": False}
            hits = index.search_captions(parsed, k, collection=collection, threshold=threshold)
            return {"hits": [hit.to_dict() for hit in hits], "available": True}

    @app.get("/api/collections", summary="Caption collections")
    def collections() -> list[dict[str, Any]]:
        with lock:
            return index.collections()

    def rendering(kind: str, image_id: int, request: Request) -> Response:
        with lock:
            row = ok_row(image_id)
        version = _version(row)
        etag = f'"{kind}-{image_id}-{version}"'
        # A URL naming the current version never changes content: cache it for good; any other URL revalidates.
        current = request.query_params.get("v") == version
        headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable" if current
                   else "private, no-cache"}
        if _etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        return Response(thumbs.get(kind, row), media_type="image/jpeg", headers=headers)

    @app.get("/api/images/{image_id}/thumbnail", summary="A small JPEG of the image, EXIF-rotated",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def thumbnail(image_id: IMAGE_ID, request: Request,
                  v: Annotated[str | None, QueryParam(description="Version from a result's URL.")] = None) -> Response:
        """At most 400 px on the longest side; made on first request and cached on disk in the index directory.
        Sent with an ETag (If-None-Match gives 304); a URL with the current `v` may be cached for good."""
        return rendering("thumbnail", image_id, request)

    @app.get("/api/images/{image_id}/preview", summary="A large JPEG of the image, EXIF-rotated",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def preview(image_id: IMAGE_ID, request: Request,
                v: Annotated[str | None, QueryParam(description="Version from a result's URL.")] = None) -> Response:
        """At most 1600 px on the longest side; cached and sent like the thumbnail."""
        return rendering("preview", image_id, request)

    @app.get("/api/images/{image_id}/file", summary="The original file", response_class=FileResponse)
    def original(image_id: IMAGE_ID) -> FileResponse:
        """The indexed file itself (found by id in the index, never by a path in the request)."""
        with lock:
            row = ok_row(image_id)
        if not os.path.isfile(row["path"]):
            raise NotFound(f"the file of image {image_id} is not there now: {row['path']}")
        return FileResponse(row["path"], filename=os.path.basename(row["path"]), content_disposition_type="inline",
                            headers={"Cache-Control": "private, no-cache"})

    @app.post("/api/upload", response_model=UploadResults, summary="Images and captions nearest to an uploaded image",
              openapi_extra={"requestBody": {"required": True, "content": {"image/*": {"schema": {
                  "type": "string", "format": "binary"}}}}})
    async def upload(request: Request, q: str = "", not_: NOT = [], under: UNDER = [], after: AFTER = None,
                     before: BEFORE = None, types: TYPES = [], threshold: THRESHOLD = None, k: K = 48,
                     captions_k: Annotated[int, QueryParam(ge=0, le=MAX_PAGE)] = 10) -> dict:
        """The request body is the image file itself (any format the indexer reads), at most 20 MB (larger: 413).
        It is decoded from a temp file in the system's temp folder that is deleted at once: never written into a
        photo folder or the index. Returns the indexed images nearest to it (within the filters; mixed with `q` and
        `not` parts when given, as in `2*"at night"`) and the captions nearest to the image itself."""
        checked = await run_in_threadpool(upload_parameters, q, not_, under, after, before, types, threshold)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
            return _error(413, f"upload too large: at most {MAX_UPLOAD_BYTES // 2 ** 20} MB")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_UPLOAD_BYTES:
                return _error(413, f"upload too large: at most {MAX_UPLOAD_BYTES // 2 ** 20} MB")
        if not body:
            raise BadInput("the upload is empty: send the image file as the request body")
        return await run_in_threadpool(nearest_to_upload, bytes(body), *checked, k, captions_k)

    def upload_parameters(q: str, not_: list[str], under: list[str], after: str | None, before: str | None,
                          types: list[str], threshold: float | None) -> tuple[Query, Filters, float | None]:
        """Checked before the body is read, off the event loop (the lock may be held by a search)."""
        with lock:
            return upload_query(q, not_), Filters.build(folders(under), after, before, types), \
                check_threshold(threshold)

    def nearest_to_upload(data: bytes, parsed: Query, chosen: Filters, threshold: float | None, k: int,
                          captions_k: int) -> dict:
        with lock:
            model = index.model
        with tempfile.NamedTemporaryFile(prefix="clipsearch-upload-") as temp:
            temp.write(data)
            temp.flush()
            try:
                decoded = media.load(temp.name, model.preprocess)
            except media.MediaError as exc:
                raise BadInput(f"cannot read the uploaded image: {exc}") from exc
        with lock:
            uploaded = model.encode_images(media.to_model_input(decoded.pixels[None], model.preprocess))[0]
            vector, own = mixed_vector(index, parsed, uploaded)
            hits = search_images(index.store, index.vectors(), vector, k, filters=chosen, threshold=threshold,
                                 exclude=own)
            nearest = []
            if captions_k and index.store.caption_count():
                nearest = search_captions(index.store, index.caption_vectors(), uploaded, captions_k)
            return {"width": decoded.width, "height": decoded.height, "similar": image_hits(hits),
                    "captions": [hit.to_dict() for hit in nearest]}

    def warm_up() -> None:
        """Load FAISS (and build its scan copy), the text encoder (ONNX or torch) and the image model before anyone
        asks, and encode one text: the first query then costs what every query costs (a first forward pass alone
        took 1.4 s of a 2.3 s first query on a 100k index), and the first upload does not wait for torch. A model
        that cannot load leaves text search working; uploads then answer 503 with the reason."""
        with lock:
            if index.store.dim is None:
                return
            index.vectors().warm()
            index.encode_texts(["a photo"])
            try:
                _ = index.model
            except ModelError:
                pass

    app.state.warm_up = warm_up
    return app


# ------------------------------------------------------------------------------------------------------------ serving
def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise BadInput(f"cannot listen on {host}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise BadInput(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


class WebServer:
    """The app bound to a socket: binding happens at once, so the URL is known (and 'port in use' is reported) before
    anything runs (connections wait in the backlog meanwhile). `warm_up()` loads FAISS and the model; `run()` serves
    until `stop()`; `start()` serves from a thread (tests, embedding); `with` starts and stops."""

    def __init__(self, index: index_api.Index, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        self.app = create_app(index, allowed_hosts=LOOPBACK_NAMES if is_loopback(host) else None)
        self.socket = _bind(host, port)
        bound_host, bound_port = self.socket.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}/"
        config = uvicorn.Config(self.app, host=bound_host, port=bound_port, log_level="warning", access_log=False,
                                lifespan="off", server_header=False)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def warm_up(self) -> None:
        self.app.state.warm_up()

    def run(self) -> None:
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def start(self, timeout: float = 30.0) -> "WebServer":
        self._thread = threading.Thread(target=self.run, name="clipsearch-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the web server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "WebServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(index: str | os.PathLike | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
          open_browser: bool = False, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the page and API over an existing index until interrupted. FAISS and the model are loaded first, so the
    first query is as fast as any; then `on_ready(url)` is called and (with `open_browser`) the page opened."""
    with index_api.open(index, create=False) as idx:
        server = WebServer(idx, host, port)
        try:
            server.warm_up()
            if on_ready is not None:
                on_ready(server.url)
            if open_browser:
                webbrowser.open(server.url)
            server.run()
        finally:
            server.socket.close()
