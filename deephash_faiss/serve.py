"""HTTP search service and web page (``dhf serve``).

One process holds one index: the model, the FAISS code index and every fc7 feature are
loaded once, when the app is created. Endpoints:

* ``POST /search`` - a multipart upload (field ``image``) or JSON ``{"id": N}`` (a
  database image as the query), with ``mode`` (bcs|hds|es), ``k``, ``radius``,
  ``max_candidates`` as form/JSON fields or query parameters. The answer is what
  ``dhf search --json`` prints for one query, plus ``thumbnail_url`` per result.
* ``GET /images/{id}`` - a database image by integer id (``?thumb=1``: a JPEG thumbnail
  of at most 128 px). Only the integer reaches the lookup: the file path comes from the
  index's own shards, never from the request.
* ``GET /healthz``, ``GET /info`` (manifest summary), ``GET /docs`` (OpenAPI), ``GET /``
  (the page in ``deephash_faiss/static/``).

The :class:`~deephash_faiss.search.Searcher` is not thread-safe, so every encode and
search runs on one dedicated worker thread; requests wait for it at most
``request_timeout_s`` (then 504) and at most ``max_pending`` wait at once (then 503).
Image decoding and thumbnails run on the server's ordinary thread pool.
"""

from __future__ import annotations

import asyncio
import io
import json
import mimetypes
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from . import __version__
from .data import ImageDecodeError, _to_rgb, check_pixels, decode_image
from .errors import DhfError
from .search import DEFAULT_MAX_CANDIDATES, DEFAULT_RADIUS, MODES, Searcher, results_to_records

try:  # the "serve" extra: pip install 'deephash-faiss[serve]'
    from fastapi import FastAPI, HTTPException, Path, Query, Request
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.datastructures import UploadFile
except ImportError as _err:  # pragma: no cover - reported by create_app
    _IMPORT_ERROR: ImportError | None = _err
else:
    _IMPORT_ERROR = None

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_PENDING = 64
K_LIMIT = 1000
THUMB_PX = 128
THUMB_CACHE = 4096
# Browsers show these as they are; anything else (TIFF, PPM, ...) is converted to PNG.
_WEB_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
                "BMP": "image/bmp"}


# ---------------------------------------------------------------- decoding uploads

def decode_image_bytes(data: bytes, size: int) -> np.ndarray:
    """Decode an upload (encoded bytes) to uint8 [size, size, 3] exactly as indexing decodes
    a file (:func:`deephash_faiss.data.decode_image`); a writable copy."""
    return np.array(decode_image(data, size), dtype=np.uint8)


# ---------------------------------------------------------------- the engine

class SearchEngine:
    """A :class:`Searcher` behind a single worker thread, plus the image lookups.

    Args:
        searcher: an opened index (features preferably in memory).
        request_timeout_s: how long a request waits for its search (then :class:`asyncio.TimeoutError`).
        max_pending: requests allowed to wait for the worker at once.
    """

    def __init__(self, searcher: Searcher, request_timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_pending: int = DEFAULT_MAX_PENDING):
        self.s = searcher
        self.timeout = float(request_timeout_s)
        self.max_pending = int(max_pending)
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dhf-search")
        # Load everything lazily-loaded now, on this thread, before any request arrives.
        self.model = searcher.model
        self.paths = searcher.store.paths()
        self.labels = searcher.store.labels()
        self.codes = searcher.codes()
        self.classes = list(searcher.manifest.get("classes", []))
        self.load_size = int(self.model.config.load_size)
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()
        self._thumb_lock = threading.Lock()

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    # -- limits -------------------------------------------------------------------------
    @property
    def k_max(self) -> int:
        return max(1, min(K_LIMIT, self.s.live_count()))

    def is_live(self, image_id: int) -> bool:
        if not 0 <= image_id < self.s.count:
            return False
        d = self.s.index.deleted
        return d is None or not bool(d[image_id])

    # -- running on the worker -------------------------------------------------------------
    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the search thread; raises :class:`OverflowError` when too many wait,
        :class:`asyncio.TimeoutError` after ``request_timeout_s``."""
        with self._pending_lock:
            if self._pending >= self.max_pending:
                raise OverflowError("too many searches waiting")
            self._pending += 1
        try:
            fut = self._worker.submit(fn)
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.timeout)
        finally:
            with self._pending_lock:
                self._pending -= 1

    # -- queries ----------------------------------------------------------------------------
    def encode(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [S, S, 3] -> (codes uint8 [1, bits / 8], features float32 [1, D]). Worker thread only."""
        from .extract import encode_array

        codes, feats, _ = encode_array(self.model, img[None], self.s.device)
        return codes, feats.astype(np.float32)

    def stored_query(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """A database row as a query: (codes uint8 [1, bits / 8], features float32 [1, D])."""
        ids = np.asarray([image_id], dtype=np.int64)
        return self.codes[ids], self.s.store.gather(ids).astype(np.float32)

    def search(self, mode: str, codes: np.ndarray, feats: np.ndarray, k: int, radius: int,
               max_candidates: int) -> dict[str, Any]:
        """One query through :meth:`Searcher.search` -> the ``dhf search --json`` record
        (without ``query``). Worker thread only."""
        batch = self.s.search(mode, codes, feats, k, radius, max_candidates)
        rows = results_to_records(batch, self.s)[0]
        res = batch.results[0]
        for row in rows:
            row["thumbnail_url"] = f"/images/{row['id']}?thumb=1"
            row["image_url"] = f"/images/{row['id']}"
        return {"mode": mode, "results": rows, "timing_ms": round(batch.timing_ms, 3),
                "candidates": int(res.candidates), "truncated": bool(res.truncated)}

    # -- images -----------------------------------------------------------------------------
    def image_path(self, image_id: int) -> str:
        """The stored path of a live database row (from the shards, never from a request)."""
        return self.paths[image_id]

    def thumbnail(self, image_id: int) -> bytes:
        """A JPEG of at most THUMB_PX x THUMB_PX (aspect kept), cached in memory."""
        with self._thumb_lock:
            hit = self._thumbs.get(image_id)
            if hit is not None:
                self._thumbs.move_to_end(image_id)
                return hit
        from PIL import Image

        with Image.open(self.image_path(image_id)) as img:
            check_pixels(img)
            img.draft("RGB", (THUMB_PX, THUMB_PX))
            img = _to_rgb(img)
            img.thumbnail((THUMB_PX, THUMB_PX), Image.LANCZOS)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=88)
        data = buf.getvalue()
        with self._thumb_lock:
            self._thumbs[image_id] = data
            while len(self._thumbs) > THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return data

    def full_image(self, image_id: int) -> tuple[bytes | None, str, str]:
        """(PNG bytes or None, media type, path): None means serve the file as it is."""
        from PIL import Image

        path = self.image_path(image_id)
        with Image.open(path) as img:
            media = _WEB_FORMATS.get(img.format or "")
            if media:
                return None, media, path
            check_pixels(img)
            img = _to_rgb(img)
            buf = io.BytesIO()
            img.save(buf, "PNG")
        return buf.getvalue(), "image/png", path

    def info(self) -> dict[str, Any]:
        m = self.s.manifest
        return {
            "version": __version__,
            "index_dir": os.path.abspath(self.s.index_dir),
            "created": m.get("created"),
            "count": int(m["count"]),
            "live_count": int(self.s.live_count()),
            "bits": int(m["bits"]),
            "model": {"backbone": m["model"]["backbone"], "input_size": m["model"].get("input_size"),
                      "load_size": m["model"].get("load_size"), "sha256": m["model"].get("sha256")},
            "feature_dim": int(m["feature_dim"]),
            "feature_dtype": m["feature_dtype"],
            "classes": self.classes,
            "index": {k: v for k, v in m["index"].items() if k != "file"},
            "device": str(self.s.device),
            "modes": list(MODES),
            "limits": {"k_max": self.k_max, "radius_max": int(m["bits"]), "max_candidates_min": 1},
            "defaults": {"mode": "hds", "k": min(10, self.k_max), "radius": DEFAULT_RADIUS,
                         "max_candidates": DEFAULT_MAX_CANDIDATES},
        }


# ---------------------------------------------------------------- request parsing

def _int_param(params: dict[str, Any], name: str, default: int) -> int:
    v = params.get(name)
    if v is None or v == "":
        return default
    if isinstance(v, bool):
        raise _bad(f"{name} must be an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    raise _bad(f"{name} must be an integer, got {str(v)[:40]!r}")


def _bad(msg: str, status: int = 422):
    return HTTPException(status_code=status, detail=msg)


def _search_params(engine: SearchEngine, params: dict[str, Any]) -> tuple[str, int, int, int]:
    mode = str(params.get("mode") or "hds").lower()
    if mode not in MODES:
        raise _bad(f"mode must be one of {', '.join(MODES)}, got {mode[:20]!r}")
    k = _int_param(params, "k", min(10, engine.k_max))
    radius = _int_param(params, "radius", DEFAULT_RADIUS)
    maxc = _int_param(params, "max_candidates", DEFAULT_MAX_CANDIDATES)
    if not 1 <= k <= engine.k_max:
        raise _bad(f"k must be between 1 and {engine.k_max} (the index holds {engine.s.live_count()} images)")
    if not 0 <= radius <= engine.s.bits:
        raise _bad(f"radius must be between 0 and {engine.s.bits} (the code length)")
    if maxc < 1:
        raise _bad("max_candidates must be at least 1")
    return mode, k, radius, maxc


async def _read_body_limited(request, limit: int) -> bytes:
    """The request body, or 413 as soon as it passes ``limit`` bytes."""
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            if int(cl) > limit:
                raise _bad(f"upload too large: {int(cl)} bytes, the limit is {limit} bytes", 413)
        except ValueError:
            raise _bad("bad Content-Length header", 400) from None
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise _bad(f"upload too large: more than {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------- the app

_SEARCH_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image"],
                "properties": {
                    "image": {"type": "string", "format": "binary", "description": "the query image"},
                    "mode": {"type": "string", "enum": list(MODES), "default": "hds"},
                    "k": {"type": "integer", "minimum": 1, "default": 10},
                    "radius": {"type": "integer", "minimum": 0, "default": DEFAULT_RADIUS},
                    "max_candidates": {"type": "integer", "minimum": 1, "default": DEFAULT_MAX_CANDIDATES},
                }}},
            "application/json": {"schema": {
                "type": "object", "required": ["id"],
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "description": "a database image id as the query"},
                    "mode": {"type": "string", "enum": list(MODES), "default": "hds"},
                    "k": {"type": "integer", "minimum": 1, "default": 10},
                    "radius": {"type": "integer", "minimum": 0, "default": DEFAULT_RADIUS},
                    "max_candidates": {"type": "integer", "minimum": 1, "default": DEFAULT_MAX_CANDIDATES},
                }}},
        },
    },
    "responses": {
        "413": {"description": "upload larger than the limit"},
        "415": {"description": "the upload is not an image, or the body is neither multipart nor JSON"},
        "422": {"description": "a parameter out of range (k, radius, max_candidates, mode, id)"},
        "503": {"description": "too many searches waiting"},
        "504": {"description": "the search took longer than the request timeout"},
    },
}


def create_app(index_dir: str, device: str = "auto", max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               request_timeout_s: float = DEFAULT_TIMEOUT_S, max_pending: int = DEFAULT_MAX_PENDING,
               searcher: Searcher | None = None):
    """Build the FastAPI app for one index directory (model and index load now).

    Args:
        index_dir: a directory written by ``dhf build-index``.
        device: "auto", "cpu" or "cuda" for encoding queries and L2.
        max_upload_bytes: larger uploads get 413.
        request_timeout_s: a search not done by then gets 504.
        max_pending: searches allowed to wait for the search thread at once (then 503).
        searcher: an already opened :class:`Searcher` to serve instead of opening ``index_dir``.
    Raises:
        DhfError: the index cannot be opened.
    """
    if _IMPORT_ERROR is not None:
        raise DhfError(f"dhf serve needs FastAPI: pip install 'deephash-faiss[serve]' ({_IMPORT_ERROR})")
    if max_upload_bytes < 1:
        raise DhfError("--max-upload-mb must be positive")
    if not request_timeout_s > 0:
        raise DhfError("the request timeout must be positive")
    if searcher is None:
        from .api import open_index

        searcher = open_index(index_dir, device=device, features_in_memory=True)
    engine = SearchEngine(searcher, request_timeout_s, max_pending)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(
        title="deephash-faiss search",
        version=__version__,
        description="Image retrieval with learned binary hash codes (Lin et al., CVPRW 2015): BCS (Hamming "
                    "ranking), HDS (Hamming pool + fc7 L2 rerank) and ES (exhaustive fc7 L2).",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.max_upload_bytes = int(max_upload_bytes)

    async def _run(fn):
        try:
            return await engine.run(fn)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"search took longer than {engine.timeout:g} s") from None
        except OverflowError:
            raise HTTPException(503, "server busy: too many searches waiting, try again") from None
        except DhfError as err:
            raise HTTPException(422, str(err)) from None

    @app.post("/search", openapi_extra=_SEARCH_OPENAPI, summary="Search by uploaded image or database id")
    async def search(request: Request):
        """Multipart (field ``image``) or JSON ``{"id": N}``; parameters in the body or the query string.
        Returns ``mode, query, query_id, results[{rank, id, path, label, hamming, distance,
        thumbnail_url, image_url}], timing_ms, encode_ms, candidates, truncated``."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        params: dict[str, Any] = dict(request.query_params)
        upload: bytes | None = None
        query_name = "upload"
        query_id: int | None = None
        limit = app.state.max_upload_bytes
        if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            body = await _read_body_limited(request, limit + 64 * 1024)
            request._body = body  # starlette re-reads a cached body when parsing the form
            try:
                form = await request.form(max_files=1, max_fields=16)
            except HTTPException:
                raise
            except Exception as err:  # noqa: BLE001 - malformed multipart
                raise _bad(f"cannot parse the multipart body: {str(err)[:120]}", 400) from None
            for key in ("mode", "k", "radius", "max_candidates", "id"):
                v = form.get(key)
                if isinstance(v, str):
                    params[key] = v
            image = form.get("image")
            if image is None:
                if params.get("id") in (None, ""):
                    raise _bad("send an image file in the multipart field 'image' (or JSON {\"id\": N})")
            elif not isinstance(image, UploadFile):
                raise _bad("the multipart field 'image' must be a file")
            else:
                upload = await image.read()
                query_name = os.path.basename(image.filename or "") or "upload"
                await form.close()
                if len(upload) > limit:
                    raise _bad(f"upload too large: {len(upload)} bytes, the limit is {limit} bytes", 413)
        elif ctype == "application/json":
            body = await _read_body_limited(request, 64 * 1024)
            try:
                data = json.loads(body or b"null")
            except ValueError:
                raise _bad("the body is not valid JSON") from None
            if not isinstance(data, dict):
                raise _bad("the JSON body must be an object such as {\"id\": 0, \"mode\": \"hds\", \"k\": 10}")
            params.update(data)
        elif "id" not in params:
            raise _bad("send multipart/form-data with an 'image' file, or JSON {\"id\": N}", 415)
        mode, k, radius, maxc = _search_params(engine, params)
        if upload is None:
            query_id = _int_param(params, "id", -1)
            if params.get("id") is None:
                raise _bad("give an image upload or a database id")
            if not engine.is_live(query_id):
                raise _bad(f"no database image with id {query_id} (ids run 0..{engine.s.count - 1})")
            query_name = engine.image_path(query_id)

        t0 = time.perf_counter()
        if upload is not None:
            from starlette.concurrency import run_in_threadpool

            try:
                img = await run_in_threadpool(decode_image_bytes, upload, engine.load_size)
            except ImageDecodeError as err:
                status = 413 if "decompression bomb" in str(err) else 415
                raise _bad(f"the upload is not a usable image: {err}", status) from None

            def job():
                t = time.perf_counter()
                codes, feats = engine.encode(img)
                enc = (time.perf_counter() - t) * 1e3
                return enc, engine.search(mode, codes, feats, k, radius, maxc)
        else:
            def job():
                t = time.perf_counter()
                codes, feats = engine.stored_query(query_id)
                enc = (time.perf_counter() - t) * 1e3
                return enc, engine.search(mode, codes, feats, k, radius, maxc)

        encode_ms, rec = await _run(job)
        out = {"mode": rec["mode"], "query": query_name, "query_id": query_id, "results": rec["results"],
               "timing_ms": rec["timing_ms"], "encode_ms": round(encode_ms, 3),
               "candidates": rec["candidates"], "truncated": rec["truncated"],
               "k": k, "radius": radius, "max_candidates": maxc,
               "total_ms": round((time.perf_counter() - t0) * 1e3, 3)}
        return JSONResponse(out)

    @app.get("/images/{image_id}", summary="A database image (or its thumbnail) by id",
             responses={200: {"content": {"image/jpeg": {}, "image/png": {}}},
                        404: {"description": "no such image"}})
    def image(image_id: int = Path(..., ge=0, le=2**62, description="database id (row number)"),
              thumb: bool = Query(False, description=f"a JPEG of at most {THUMB_PX} px instead of the original")):
        if not engine.is_live(image_id):
            raise HTTPException(404, f"no database image with id {image_id}")
        try:
            if thumb:
                return Response(engine.thumbnail(image_id), media_type="image/jpeg",
                                headers={"Cache-Control": "public, max-age=3600"})
            data, media, path = engine.full_image(image_id)
        except FileNotFoundError:
            raise HTTPException(404, f"the file of image {image_id} is missing on the server") from None
        except Exception as err:  # noqa: BLE001 - unreadable file on disk
            raise HTTPException(500, f"cannot read image {image_id}: {type(err).__name__}") from None
        if data is None:
            return FileResponse(path, media_type=media, headers={"Cache-Control": "public, max-age=3600"})
        return Response(data, media_type=media, headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/healthz", summary="Liveness")
    def healthz():
        return {"status": "ok", "count": engine.s.count, "live_count": engine.s.live_count()}

    @app.get("/info", summary="What the index holds")
    def info():
        return engine.info()

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def run(index_dir: str, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, request_timeout_s: float = DEFAULT_TIMEOUT_S,
        log_level: str = "info", on_ready: Callable[[str], None] | None = None) -> None:
    """Serve ``index_dir`` with uvicorn until interrupted (one process, one search thread)."""
    import uvicorn

    app = create_app(index_dir, device, max_upload_bytes, request_timeout_s)
    if on_ready:
        n = app.state.engine.s.count
        on_ready(f"serving {n} images from {index_dir} at http://{host}:{port}/ (API docs at /docs)")
    uvicorn.run(app, host=host, port=port, log_level=log_level)


mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/css", ".css")
