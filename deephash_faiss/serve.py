"""HTTP search service and web page (``dhf serve``).

One process holds one index: the model, the FAISS code index and every fc7 feature are
loaded once, when the app is created. Endpoints:

* ``POST /search`` - a multipart upload (field ``image``) or JSON ``{"id": N}`` (a
  database image as the query), with ``mode`` (bcs|hds|es), ``k``, ``radius``,
  ``max_candidates``, ``hds_mode`` (exact|ivf|auto), ``nprobe``, ``refine`` as form/JSON
  fields or query parameters. The answer is what ``dhf search --json`` prints for one
  query (``hds_mode``: the ranking that ran; ``truncated``: the safety limit cut it), plus
  ``thumbnail_url`` per result.
* ``GET /images/{id}`` - a database image by integer id (``?thumb=1``: a JPEG thumbnail
  of at most 128 px). Only the integer reaches the lookup: the file path comes from the
  index's own shards, never from the request.
* ``GET /healthz``, ``GET /info`` (manifest summary), ``GET /docs`` (OpenAPI), ``GET /``
  (the page in ``deephash_faiss/static/``).

The :class:`~deephash_faiss.search.Searcher` is not thread-safe, so every encode and
search runs on one dedicated worker thread; requests wait for it at most
``request_timeout_s`` (then 504) and at most ``max_pending`` wait at once (then 503).
Image decoding and thumbnails run on the server's ordinary thread pool, at most
``max_decodes`` at once, each refused from its header above ``max_pixels``.

Safety: requests whose ``Host`` header is not allowed get 400 (DNS rebinding; loopback
names by default); responses carry no server paths (``path`` is relative to the indexed
folder) and encode any file name as UTF-8 (undecodable bytes as ``\\xNN``). The index is
reopened in the background when its manifest changes (``dhf add`` / ``remove`` /
``compact``); requests in flight finish on the generation they started on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import mimetypes
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from . import __version__
from .data import (PIL_FORMATS, ImageDecodeError, ImageTooLargeError, _to_rgb, check_pixels, decode_image,
                   exif_oriented, one_line, reduce_while_decoding, release_memory)
from .errors import DhfError
from .fine import default_probe
from .search import (DEFAULT_MAX_CANDIDATES, DEFAULT_RADIUS, MODES, Searcher, SearchParams,
                     results_to_records)

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
DEFAULT_MAX_PIXELS = 25_000_000  # decoded pixels of an upload (after a JPEG's DCT reduction)
DEFAULT_MAX_DECODES = 2  # uploads / thumbnails decoded at once
DEFAULT_MAX_UPLOADS = 8  # request bodies received at once
BODY_IDLE_S = 30.0  # a request body that sends nothing for this long gets 408
RELEASE_AFTER_BYTES = 4 * 2**20  # uploads from this size hand their memory back to the OS after decoding
GRACEFUL_SHUTDOWN_S = 5.0  # on SIGINT/SIGTERM, connections still open after this are closed
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "[::1]")
DEFAULT_RELOAD_CHECK_S = 1.0  # at most one stat of manifest.json per this many seconds
K_LIMIT = 1000
THUMB_PX = 128
THUMB_CACHE = 4096
# Browsers show these as they are; anything else (TIFF, PPM, ...) is converted to PNG.
_WEB_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
                "BMP": "image/bmp"}


# ---------------------------------------------------------------- decoding uploads

def decode_image_bytes(data: bytes, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode an upload (encoded bytes) to uint8 [size, size, 3] exactly as indexing decodes
    a file (:func:`deephash_faiss.data.decode_image`); a writable copy.

    Raises:
        ImageTooLargeError: more than ``max_pixels`` decoded pixels (checked from the header).
        ImageDecodeError: not a usable image.
    """
    return np.array(decode_image(data, size, max_pixels), dtype=np.uint8)


def decode_upload(data: bytes, size: int, max_pixels: int | None = None):
    """(uint8 [size, size, 3], None), or (None, (HTTP status, message)) for an upload that is
    too large (413) or not a usable image (415). Never raises those: an exception carried out
    of the decode thread kept the upload's bytes alive (in its frames) until the next
    garbage collection, i.e. a server's memory grew by every refused upload."""
    try:
        return decode_image_bytes(data, size, max_pixels), None
    except ImageTooLargeError as err:
        return None, (413, f"the upload is too large to decode: {err}")
    except ImageDecodeError as err:
        return None, (415, f"the upload is not a usable image: {err}")


# ---------------------------------------------------------------- safe responses

def public_text(s: str) -> str:
    """``s`` as text that encodes to UTF-8: the surrogate escapes Python uses for the
    undecodable bytes of a file name (``os.fsdecode(b"\\xff.png")``) become ``\\xff``."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        try:
            raw = s.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # lone surrogates that are not escapes of bytes
            return s.encode("utf-8", "backslashreplace").decode("utf-8")
        return raw.decode("utf-8", "backslashreplace")


def _public_json(x: Any) -> Any:
    if isinstance(x, str):
        return public_text(x)
    if isinstance(x, dict):
        return {_public_json(k): _public_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_public_json(v) for v in x]
    return x


if _IMPORT_ERROR is None:
    class SafeJSONResponse(JSONResponse):
        """JSONResponse whose strings are always valid UTF-8 (see :func:`public_text`)."""

        def render(self, content: Any) -> bytes:
            try:
                return super().render(content)
            except UnicodeEncodeError:
                return super().render(_public_json(content))


def host_name(value: str | None) -> str:
    """The host part of a ``Host`` header or an allow-list entry, lower case:
    ``"LocalHost:8000"`` -> ``"localhost"``, ``"[::1]:80"`` / ``"::1"`` -> ``"[::1]"``."""
    h = (value or "").strip().lower()
    if h.startswith("["):
        end = h.find("]")
        return h[: end + 1] if end > 0 else h
    if h.count(":") > 1:  # a bare IPv6 address
        return f"[{h}]"
    name, sep, port = h.rpartition(":")
    if sep and (port.isdigit() or not port):
        h = name
    return h.rstrip(".")


class HostAllowList:
    """ASGI middleware: 400 for a request whose ``Host`` is not in ``hosts`` (DNS rebinding
    protection). Entries are host names or addresses (a port is ignored), ``*.example.org``
    for any subdomain, or ``*`` for any host."""

    def __init__(self, app, hosts):
        self.app = app
        self.any = "*" in hosts
        self.exact = {host_name(h) for h in hosts if not h.startswith("*")}
        self.suffixes = tuple(host_name(h)[1:] for h in hosts if h.startswith("*."))

    def allowed(self, header: str | None) -> bool:
        if self.any:
            return True
        name = host_name(header)
        return bool(name) and (name in self.exact or (bool(self.suffixes) and name.endswith(self.suffixes)))

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), None)
            if not self.allowed(header):
                shown = one_line(header or "(none)", 80)
                resp = SafeJSONResponse({"detail": f"host {shown!r} is not allowed (start dhf serve with "
                                                   f"--allow-host NAME to serve it under that name)"}, 400)
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _CheckReload:
    """ASGI middleware: :meth:`SearchEngine.check_reload` before every HTTP request."""

    def __init__(self, app, engine):
        self.app, self.engine = app, engine

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.engine.check_reload()
        await self.app(scope, receive, send)


class Busy(Exception):
    """Too many requests already wait for the search thread or for a decode slot (503)."""


# ---------------------------------------------------------------- the engine

def _manifest_stamp(index_dir: str) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of ``index_dir/manifest.json``: every commit renames a new
    manifest into place, so a new generation always changes the inode."""
    try:
        st = os.stat(os.path.join(index_dir, "manifest.json"))
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class IndexView:
    """One generation of the index, as served: a :class:`Searcher` with its model, codes,
    paths and labels loaded, plus its thumbnail cache. Requests hold the view they started
    with, so a reload never changes the data under a request in flight.

    Args:
        searcher: an opened index (features preferably in memory).
        stamp: the manifest's :func:`_manifest_stamp` when it was opened.
    """

    def __init__(self, searcher: Searcher, stamp: tuple[int, int, int] | None = None):
        self.s = searcher
        searcher.fine_index()  # the saved fine index, loaded with the rest (not on a request)
        self.stamp = stamp
        self.generation = int(searcher.manifest.get("generation", 1))
        # Load everything lazily-loaded now, on this thread, before any request sees it.
        self.model = searcher.model
        self.paths = searcher.store.paths()
        self.labels = searcher.store.labels()
        self.codes = searcher.codes()
        self.classes = list(searcher.manifest.get("classes", []))
        self.load_size = int(self.model.config.load_size)
        source = searcher.manifest.get("source")
        self.root = os.path.normpath(source) if isinstance(source, str) and source else None
        self._cwd = os.getcwd()  # stored relative paths are relative to where the server runs
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()
        self._thumb_lock = threading.Lock()

    # -- limits -------------------------------------------------------------------------
    @property
    def k_max(self) -> int:
        return max(1, min(K_LIMIT, self.s.live_count()))

    def is_live(self, image_id: int) -> bool:
        if not 0 <= image_id < self.s.count:
            return False
        d = self.s.index.deleted
        return d is None or not bool(d[image_id])

    # -- names ------------------------------------------------------------------------------
    def public_path(self, image_id: int) -> str:
        """The name a client sees for a database image: its path relative to the indexed
        folder (the manifest's ``source``), or its file name when it lies outside it. Never
        a server path."""
        p = os.path.normpath(os.path.join(self._cwd, self.paths[image_id]))
        root = self.root
        if root and p.startswith(root.rstrip(os.sep) + os.sep):
            return os.path.relpath(p, root)
        return os.path.basename(p)

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
               max_candidates: int, hds_mode: str | None = None, nprobe: int | None = None,
               refine: int | None = None) -> dict[str, Any]:
        """One query through :meth:`Searcher.search` -> the ``dhf search --json`` record
        (without ``query``; ``path`` relative to the indexed folder). Worker thread only."""
        batch = self.s.search(mode, codes, feats, k, radius, max_candidates, hds_mode=hds_mode, nprobe=nprobe,
                              refine=refine)
        rows = results_to_records(batch, self.s)[0]
        res = batch.results[0]
        for row in rows:
            row["path"] = self.public_path(row["id"])
            row["thumbnail_url"] = f"/images/{row['id']}?thumb=1"
            row["image_url"] = f"/images/{row['id']}"
        out = {"mode": mode, "results": rows, "timing_ms": round(batch.timing_ms, 3),
               "candidates": int(res.candidates), "truncated": bool(res.truncated)}
        if mode == "hds":
            out["hds_mode"] = (batch.extra.get("query_modes") or ["exact"])[0]
            out["examined"] = int(batch.extra["examined"][0]) if out["hds_mode"] == "ivf" else int(res.candidates)
        return out

    # -- images -----------------------------------------------------------------------------
    def image_path(self, image_id: int) -> str:
        """The stored path of a live database row (from the shards, never from a request)."""
        return self.paths[image_id]

    def cached_thumbnail(self, image_id: int) -> bytes | None:
        with self._thumb_lock:
            hit = self._thumbs.get(image_id)
            if hit is not None:
                self._thumbs.move_to_end(image_id)
            return hit

    def thumbnail(self, image_id: int) -> bytes:
        """A JPEG of at most THUMB_PX x THUMB_PX (aspect kept, EXIF orientation applied), cached."""
        hit = self.cached_thumbnail(image_id)
        if hit is not None:
            return hit
        from PIL import Image

        with Image.open(self.image_path(image_id), formats=PIL_FORMATS) as raw:
            reduce_while_decoding(raw, THUMB_PX)
            check_pixels(raw)
            big = raw.size[0] * raw.size[1] >= 4_000_000
            raw.load()
            img = _to_rgb(exif_oriented(raw))
            img.thumbnail((THUMB_PX, THUMB_PX), Image.LANCZOS)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=88)
            raw.close()
        if big:
            release_memory()
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
        with Image.open(path, formats=PIL_FORMATS) as img:
            media = _WEB_FORMATS.get(img.format or "")
            if media:
                return None, media, path
            check_pixels(img)
            img.load()
            img = _to_rgb(exif_oriented(img))
            buf = io.BytesIO()
            img.save(buf, "PNG")
        return buf.getvalue(), "image/png", path

    def info(self) -> dict[str, Any]:
        probe = default_probe(self.s.live_count())  # ivf defaults for this index's size
        m = self.s.manifest
        return {
            "version": __version__,
            "generation": self.generation,
            "created": m.get("created"),
            "updated": m.get("updated"),
            "count": int(m["count"]),
            "live_count": int(self.s.live_count()),
            "bits": int(m["bits"]),
            "model": {"backbone": m["model"]["backbone"], "input_size": m["model"].get("input_size"),
                      "load_size": m["model"].get("load_size"), "sha256": m["model"].get("sha256"),
                      "flip_average": bool(m["model"].get("flip_average", False))},
            "feature_dim": int(m["feature_dim"]),
            "feature_dtype": m["feature_dtype"],
            "classes": self.classes,
            "index": {k: v for k, v in m["index"].items() if k != "file"},
            "device": str(self.s.device),
            "modes": list(MODES),
            # radius: pools hold distances < radius, so bits + 1 pools every code (search.check_search_args)
            "limits": {"k_max": self.k_max, "radius_max": int(m["bits"]) + 1, "max_candidates_min": 1},
            "defaults": {"mode": "hds", "k": min(10, self.k_max), "radius": DEFAULT_RADIUS,
                         "max_candidates": DEFAULT_MAX_CANDIDATES, "hds_mode": "auto",
                         "nprobe": probe[0], "refine": probe[1]},
            "fine_index": bool(m.get("fine")),
        }


class _Slots:
    """At most ``n`` holders at once, at most ``max_waiting`` waiting, each at most
    ``timeout`` s: an asyncio semaphore of the running loop (a test client may start a
    new loop, so it is made again when the loop changes)."""

    def __init__(self, n: int, max_waiting: int, timeout: float):
        self.n, self.max_waiting, self.timeout = int(n), int(max_waiting), float(timeout)
        self._sem: asyncio.Semaphore | None = None
        self._loop = None
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def hold(self, what_waits: str, slot: str):
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._sem, self._loop = asyncio.Semaphore(self.n), loop
        sem = self._sem
        if self.waiting >= self.max_waiting:
            raise Busy(f"too many {what_waits}")
        self.waiting += 1
        try:
            await asyncio.wait_for(sem.acquire(), self.timeout)
        except asyncio.TimeoutError:
            raise Busy(f"no {slot} became free within the request timeout") from None
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            sem.release()


class SearchEngine:
    """The served index (an :class:`IndexView`, replaced when the index changes on disk)
    behind a single search thread, plus the bounded decode slots.

    Args:
        searcher: an opened index (features preferably in memory).
        request_timeout_s: how long a request waits for its search or a decode slot.
        max_pending: requests allowed to wait for the worker (and, separately, for a decode slot) at once.
        max_decodes: uploads and thumbnails decoded at once.
        max_pixels: uploads with more decoded pixels are refused from their header.
        reload_check_s: look at the manifest at most this often (on requests) and reopen
            the index in the background when it changed; None: never.
        device: where a reopened index runs (default: where ``searcher`` runs).
        max_uploads: request bodies received at once (bounds upload memory: each takes up
            to about 3x its size while it is read and parsed).
    """

    def __init__(self, searcher: Searcher, request_timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_pending: int = DEFAULT_MAX_PENDING, max_decodes: int = DEFAULT_MAX_DECODES,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 reload_check_s: float | None = DEFAULT_RELOAD_CHECK_S, device: str | None = None,
                 max_uploads: int = DEFAULT_MAX_UPLOADS):
        self.index_dir = searcher.index_dir
        self.timeout = float(request_timeout_s)
        self.max_pending = int(max_pending)
        self.max_decodes = int(max_decodes)
        self.max_uploads = int(max_uploads)
        self.max_pixels = max_pixels
        self.reload_check_s = reload_check_s
        self.device = device if device is not None else str(searcher.device)
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._worker: ThreadPoolExecutor | None = None
        self.open()
        self.view = IndexView(searcher, _manifest_stamp(self.index_dir))
        self._decode_slots = _Slots(self.max_decodes, self.max_pending, self.timeout)
        self._upload_slots = _Slots(self.max_uploads, self.max_pending, self.timeout)
        self.decodes_active = 0
        self.decodes_peak = 0
        # reloading
        self._reload_lock = threading.Lock()
        self._reloader: threading.Thread | None = None
        self._last_check = 0.0
        self._failed: tuple[Any, float] | None = None
        self.reload_error: str | None = None
        self.reloads = 0

    def open(self) -> None:
        """(Re)start the search thread (the app's startup; after :meth:`close` too)."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dhf-search")

    def close(self) -> None:
        """Stop the search thread (the app's shutdown); searches still queued are cancelled."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.shutdown(wait=False, cancel_futures=True)

    # -- running on the worker -------------------------------------------------------------
    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the search thread; raises :class:`Busy` when too many wait,
        :class:`asyncio.TimeoutError` after ``request_timeout_s``."""
        with self._pending_lock:
            if self._pending >= self.max_pending:
                raise Busy("too many searches waiting")
            self._pending += 1
        try:
            self.open()
            fut = self._worker.submit(fn)
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.timeout)
        finally:
            with self._pending_lock:
                self._pending -= 1

    # -- decoding ----------------------------------------------------------------------------
    async def decode(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run the decoding ``fn(*args)`` on the thread pool once one of the ``max_decodes``
        slots is free. Raises :class:`Busy` when ``max_pending`` already wait for a slot or
        none frees up within the request timeout."""
        from starlette.concurrency import run_in_threadpool

        async with self._decode_slots.hold("images waiting to be decoded", "decode slot"):
            self.decodes_active += 1
            self.decodes_peak = max(self.decodes_peak, self.decodes_active)
            try:
                return await run_in_threadpool(fn, *args)
            finally:
                self.decodes_active -= 1

    def upload_slot(self):
        """``async with engine.upload_slot():`` around reading a request body: at most
        ``max_uploads`` bodies are received at once (the others wait, unread, in the
        socket); :class:`Busy` as for decodes."""
        return self._upload_slots.hold("uploads waiting to be received", "upload slot")

    # -- reloading ---------------------------------------------------------------------------
    def check_reload(self) -> None:
        """Cheap (one ``stat``, at most every ``reload_check_s``): when the manifest changed
        since the served view was opened, reopen the index on a background thread. Requests
        keep the current view until the new one is complete."""
        if self.reload_check_s is None:
            return
        now = time.monotonic()
        if now - self._last_check < self.reload_check_s:
            return
        self._last_check = now
        stamp = _manifest_stamp(self.index_dir)
        if stamp is None or stamp == self.view.stamp:
            return
        if self._failed is not None and self._failed[0] == stamp and now - self._failed[1] < 10.0:
            return  # that manifest failed to open a moment ago: retry later, not on every request
        with self._reload_lock:
            if self._reloader is not None and self._reloader.is_alive():
                return
            self._reloader = threading.Thread(target=self._reload, args=(stamp,), name="dhf-reload", daemon=True)
            self._reloader.start()

    def _reload(self, stamp) -> None:
        from .api import open_index
        from .store import read_manifest

        try:
            old = self.view
            manifest = read_manifest(self.index_dir)
            if manifest == old.s.manifest:  # touched or rewritten identically: nothing to reopen
                old.stamp = stamp
                self.reload_error, self._failed = None, None  # back to the served generation: nothing is wrong
                return
            searcher = open_index(self.index_dir, device=self.device, features_in_memory=True)
            self.view = IndexView(searcher, stamp)  # one reference swap; requests in flight keep `old`
            self.reloads += 1
            self.reload_error = None
            self._failed = None
        except Exception as err:  # noqa: BLE001 - keep serving the generation that works
            self.reload_error = one_line(f"{type(err).__name__}: {err}" if not isinstance(err, DhfError) else str(err))
            self._failed = (stamp, time.monotonic())

    def wait_reloaded(self, timeout: float = 60.0) -> None:
        """Wait for a background reload in progress (tests, tools)."""
        t = self._reloader
        if t is not None:
            t.join(timeout)


# ---------------------------------------------------------------- request parsing

_INT_TEXT = re.compile(r"-?[0-9]+")  # ASCII digits only: no "1_0", no "+1", no full-width or Arabic digits


def parse_int_text(text: str) -> int | None:
    """The integer written in ``text`` (ASCII digits, an optional leading "-", spaces around
    allowed), else None."""
    t = text.strip(" \t")
    return int(t) if _INT_TEXT.fullmatch(t) else None


def _int_param(params: dict[str, Any], name: str, default: int | None) -> int | None:
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
        n = parse_int_text(v)
        if n is not None:
            return n
    raise _bad(f"{name} must be an integer, got {str(v)[:40]!r}")


def _str_param(params: dict[str, Any], name: str, default: str) -> str:
    v = params.get(name)
    if v is None or v == "":
        return default
    if not isinstance(v, str):
        raise _bad(f"{name} must be a string, got {json.dumps(v)[:40]}")
    return v.strip().lower()


def validation_message(errors: list[dict[str, Any]]) -> str:
    """One line from FastAPI's validation errors: "thumb: Input should be a valid boolean"."""
    parts = []
    for e in errors[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("path", "query", "body")]
        parts.append(f"{'.'.join(loc) or 'request'}: {e.get('msg', 'invalid')}")
    return one_line("; ".join(parts) or "invalid request")


def _bad(msg: str, status: int = 422):
    return HTTPException(status_code=status, detail=msg)


HDS_PARAMS = ("hds_mode", "nprobe", "refine")


def _search_params(view: IndexView, params: dict[str, Any]) -> tuple[str, int, int, int, dict[str, Any]]:
    """(mode, k, radius, max_candidates, {hds_mode, nprobe, refine}) from request fields, or
    422 with one line: the bounds of :class:`deephash_faiss.search.SearchParams` (the CLI's
    and the API's), plus k <= min(K_LIMIT, live images)."""
    mode = _str_param(params, "mode", "hds")
    if mode not in MODES:
        raise _bad(f"mode must be one of {', '.join(MODES)}, got {mode[:20]!r}")
    k = _int_param(params, "k", min(10, view.k_max))
    radius = _int_param(params, "radius", DEFAULT_RADIUS)
    maxc = _int_param(params, "max_candidates", DEFAULT_MAX_CANDIDATES)
    hds = {"hds_mode": _str_param(params, "hds_mode", "auto"),
           "nprobe": _int_param(params, "nprobe", None),
           "refine": _int_param(params, "refine", None)}
    try:
        SearchParams(k, radius, maxc, mode, **hds).check(view.s.live_count(), bits=view.s.bits)
    except DhfError as err:
        msg = re.sub(r" \(--?[a-z-]+\)", "", str(err))  # the CLI's option names: not this API's
        raise _bad(msg.replace("max-candidates", "max_candidates").replace("HDS mode", "hds_mode")) from None
    if k > view.k_max:
        raise _bad(f"k must be between 1 and {view.k_max} (the index holds {view.s.live_count()} images)")
    if mode == "hds" and hds["hds_mode"] == "ivf" and view.s.fine is None:
        raise _bad("hds_mode ivf needs a fine index (`dhf fine-index`)"
                   + (f": {view.s.fine_problem}" if view.s.fine_problem else "; this index has none"))
    return mode, k, radius, maxc, hds


async def _read_body_limited(request, limit: int, what: str = "upload", shown_limit: int | None = None,
                             idle_s: float = BODY_IDLE_S) -> bytes:
    """The request body, or 413 as soon as it passes ``limit`` bytes (``shown_limit``: the
    limit the message names), 408 when the client sends nothing for ``idle_s`` seconds.
    A client that goes away mid-body raises :class:`ClientGone`."""
    from starlette.requests import ClientDisconnect

    shown = limit if shown_limit is None else shown_limit
    cl = request.headers.get("content-length")
    if cl is not None:
        n_declared = parse_int_text(cl)
        if n_declared is None or n_declared < 0:
            raise _bad("bad Content-Length header", 400)
        if n_declared > limit:
            raise _bad(f"{what} too large: {n_declared} bytes, the limit is {shown} bytes", 413)
    # The idle limit is a timer that cancels this task, not asyncio.wait_for around each chunk:
    # wait_for's task and the StopAsyncIteration at the end make a reference cycle that kept
    # each body (this frame's buffer) alive until the next garbage collection.
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    state = {"last": loop.time(), "stalled": False, "timer": None}

    def watch() -> None:
        idle = loop.time() - state["last"]
        if idle >= idle_s:
            state["stalled"] = True
            task.cancel()
        else:
            state["timer"] = loop.call_later(idle_s - idle, watch)

    state["timer"] = loop.call_later(idle_s, watch)
    buf = bytearray()
    stalled = gone = too_large = False
    try:
        async for chunk in request.stream():
            state["last"] = loop.time()
            buf += chunk
            if len(buf) > limit:
                too_large = True
                break
    except asyncio.CancelledError:
        if not state["stalled"]:
            raise
        if hasattr(task, "uncancel"):  # 3.11+: this cancellation is handled here
            task.uncancel()
        stalled = True
    except ClientDisconnect:
        gone = True
    finally:
        state["timer"].cancel()
    # raised outside the except blocks: no exception context that would keep this frame alive
    if stalled:
        raise _bad(f"the request body stalled: nothing received for {idle_s:g} s", 408)
    if gone:
        raise ClientGone()
    if too_large:
        raise _bad(f"{what} too large: more than {shown} bytes", 413)
    return bytes(buf)


class ClientGone(Exception):
    """The client closed the connection before its request body was complete."""


# ---------------------------------------------------------------- the app

_HDS_SCHEMA = {
    "hds_mode": {"type": "string", "enum": ["exact", "ivf", "auto"], "default": "auto",
                 "description": "exact: rank the whole pool; ivf: the fine index (dhf fine-index); auto: ivf when the "
                                "index has one"},
    "nprobe": {"type": "integer", "minimum": 1,
               "description": "ivf: rows probed per query in cells; default by index size (GET /info defaults)"},
    "refine": {"type": "integer", "minimum": 1,
               "description": "ivf: candidates re-ranked exactly; default by index size (GET /info defaults)"},
}

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
                    **_HDS_SCHEMA,
                }}},
            "application/json": {"schema": {
                "type": "object", "required": ["id"],
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "description": "a database image id as the query"},
                    "mode": {"type": "string", "enum": list(MODES), "default": "hds"},
                    "k": {"type": "integer", "minimum": 1, "default": 10},
                    "radius": {"type": "integer", "minimum": 0, "default": DEFAULT_RADIUS},
                    "max_candidates": {"type": "integer", "minimum": 1, "default": DEFAULT_MAX_CANDIDATES},
                    **_HDS_SCHEMA,
                }}},
        },
    },
    "responses": {
        "413": {"description": "upload larger than the limit"},
        "415": {"description": "the upload is not an image, or the body is neither multipart nor JSON"},
        "422": {"description": "a parameter out of range (k, radius, max_candidates, mode, hds_mode, nprobe, refine, id)"},
        "503": {"description": "too many searches waiting"},
        "504": {"description": "the search took longer than the request timeout"},
    },
}


def create_app(index_dir: str, device: str = "auto", max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               request_timeout_s: float = DEFAULT_TIMEOUT_S, max_pending: int = DEFAULT_MAX_PENDING,
               searcher: Searcher | None = None, allowed_hosts: tuple[str, ...] | list[str] = DEFAULT_ALLOWED_HOSTS,
               max_pixels: int | None = DEFAULT_MAX_PIXELS, max_decodes: int = DEFAULT_MAX_DECODES,
               reload_check_s: float | None = DEFAULT_RELOAD_CHECK_S, max_uploads: int = DEFAULT_MAX_UPLOADS):
    """Build the FastAPI app for one index directory (model and index load now).

    Args:
        index_dir: a directory written by ``dhf build-index``.
        device: "auto", "cpu" or "cuda" for encoding queries and L2.
        max_upload_bytes: larger uploads get 413.
        request_timeout_s: a search not done by then gets 504.
        max_pending: searches allowed to wait for the search thread at once (then 503).
        searcher: an already opened :class:`Searcher` to serve instead of opening ``index_dir``.
        allowed_hosts: ``Host`` header names served (others get 400); ``"*"`` for any.
        max_pixels: uploads with more decoded pixels get 413 (None: PIL's bomb limit only).
        max_decodes: uploads and thumbnails decoded at once (the others wait for a slot).
        reload_check_s: how often (at most, on requests) to look for a new index generation;
            None: serve the opened generation until restarted.
        max_uploads: request bodies (uploads) received at once; the others wait unread.
    Raises:
        DhfError: the index cannot be opened, or a setting is out of range.
    """
    if _IMPORT_ERROR is not None:
        raise DhfError(f"dhf serve needs FastAPI: pip install 'deephash-faiss[serve]' ({_IMPORT_ERROR})")
    if max_upload_bytes < 1:
        raise DhfError("--max-upload-mb must be positive")
    if not request_timeout_s > 0:
        raise DhfError("the request timeout must be positive")
    if max_pixels is not None and max_pixels < 1:
        raise DhfError("--max-pixels must be positive")
    if max_decodes < 1:
        raise DhfError("--max-decodes must be at least 1")
    if max_uploads < 1:
        raise DhfError("--max-uploads must be at least 1")
    hosts = [str(h).strip() for h in allowed_hosts if str(h).strip()]
    if not hosts:
        raise DhfError("no allowed host names (give --allow-host NAME, or '*' for any)")
    if searcher is None:
        from .api import open_index

        searcher = open_index(index_dir, device=device, features_in_memory=True)
    engine = SearchEngine(searcher, request_timeout_s, max_pending, max_decodes, max_pixels, reload_check_s,
                          max_uploads=max_uploads)

    from contextlib import asynccontextmanager

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(app):
        engine.open()
        yield
        engine.close()

    app = FastAPI(
        title="deephash-faiss search",
        version=__version__,
        description="Image retrieval with learned binary hash codes (Lin et al., CVPRW 2015): BCS (Hamming "
                    "ranking), HDS (Hamming pool + fc7 L2 rerank) and ES (exhaustive fc7 L2).",
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
    )
    app.state.engine = engine
    app.state.max_upload_bytes = int(max_upload_bytes)
    app.state.allowed_hosts = hosts
    app.add_middleware(_CheckReload, engine=engine)
    app.add_middleware(HostAllowList, hosts=hosts)  # outermost: a foreign Host gets nothing else

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return SafeJSONResponse({"detail": exc.detail}, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return SafeJSONResponse({"detail": validation_message(exc.errors())}, 422)

    @app.exception_handler(ClientGone)
    async def client_gone(request, exc):  # nobody is listening: no traceback in the log, no body
        return Response(status_code=400)

    async def _run(fn):
        try:
            return await engine.run(fn)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"search took longer than {engine.timeout:g} s") from None
        except Busy:
            raise HTTPException(503, "server busy: too many searches waiting, try again") from None
        except DhfError as err:
            raise HTTPException(422, str(err)) from None

    async def _decode(fn, *args):
        try:
            return await engine.decode(fn, *args)
        except Busy as err:
            raise HTTPException(503, f"server busy: {err}, try again") from None

    def _upload_slot():
        @contextlib.asynccontextmanager
        async def slot():
            try:
                async with engine.upload_slot():
                    yield
            except Busy as err:
                raise HTTPException(503, f"server busy: {err}, try again") from None
        return slot()

    async def _read_form(request, params: dict[str, Any], limit: int) -> tuple[bytes | None, str]:
        """(upload bytes or None, its base name) from a multipart/form body; form fields go to ``params``."""
        request._body = await _read_body_limited(request, limit + 64 * 1024, shown_limit=limit)
        problem = None  # starlette re-reads the cached body (request._body) when parsing the form
        try:
            form = await request.form(max_files=1, max_fields=16)
        except StarletteHTTPException as err:  # starlette's own 400s (too many files or fields, ...)
            detail = str(err.detail)[:120]
            problem = detail + (" (only 'image' may be a file)" if "files" in detail else "")
        except Exception as err:  # noqa: BLE001 - malformed multipart
            problem = str(err)[:120]
        if problem is not None:  # raised outside the except blocks, the body dropped first (no frames keep it)
            request._body = b""
            raise _bad(f"cannot parse the multipart body: {problem}", 400)
        try:
            for key in ("mode", "k", "radius", "max_candidates", "id", *HDS_PARAMS):
                v = form.get(key)
                if isinstance(v, str):
                    params[key] = v
            image = form.get("image")
            if image is None:
                if params.get("id") in (None, ""):
                    raise _bad("send an image file in the multipart field 'image' (or JSON {\"id\": N})")
                return None, "upload"
            if not isinstance(image, UploadFile):
                raise _bad("the multipart field 'image' must be a file")
            upload = await image.read()
            if len(upload) > limit:
                raise _bad(f"upload too large: {len(upload)} bytes, the limit is {limit} bytes", 413)
            return upload, os.path.basename(image.filename or "") or "upload"
        finally:
            await form.close()
            request._body = b""

    @app.post("/search", openapi_extra=_SEARCH_OPENAPI, summary="Search by uploaded image or database id")
    async def search(request: Request):
        """Multipart (field ``image``) or JSON ``{"id": N}``; parameters in the body or the query string.
        Returns ``mode, query, query_id, results[{rank, id, path, label, hamming, distance,
        thumbnail_url, image_url}], timing_ms, encode_ms, candidates, truncated``."""
        view = engine.view  # this request's generation, whatever reloads happen meanwhile
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        params: dict[str, Any] = dict(request.query_params)
        upload: bytes | None = None
        query_name = "upload"
        query_id: int | None = None
        limit = app.state.max_upload_bytes
        if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            async with _upload_slot():
                upload, query_name = await _read_form(request, params, limit)
        elif ctype == "application/json":
            body = await _read_body_limited(request, 64 * 1024, what="JSON body")
            try:
                data = json.loads(body or b"null")
            except RecursionError:
                raise _bad("the JSON body is nested too deeply") from None
            except ValueError:
                raise _bad("the body is not valid JSON") from None
            if not isinstance(data, dict):
                raise _bad("the JSON body must be an object such as {\"id\": 0, \"mode\": \"hds\", \"k\": 10}")
            params.update(data)
        elif "id" not in params:
            raise _bad("send multipart/form-data with an 'image' file, or JSON {\"id\": N}", 415)
        mode, k, radius, maxc, hds = _search_params(view, params)
        if upload is None:
            query_id = _int_param(params, "id", -1)
            if params.get("id") is None:
                raise _bad("give an image upload or a database id")
            if not view.is_live(query_id):
                raise _bad(f"no database image with id {query_id} (ids run 0..{view.s.count - 1})")
            query_name = view.public_path(query_id)

        t0 = time.perf_counter()
        if upload is not None:
            big = len(upload) >= RELEASE_AFTER_BYTES
            try:
                img, problem = await _decode(decode_upload, upload, view.load_size, engine.max_pixels)
            finally:
                del upload
            if big:  # hand the body's copies back to the OS, not to glibc's arenas
                release_memory()
            if problem:  # raised outside the except block: the decode's frames (and the upload) are freed now
                raise _bad(problem[1], problem[0])

            def job():
                t = time.perf_counter()
                codes, feats = view.encode(img)
                enc = (time.perf_counter() - t) * 1e3
                return enc, view.search(mode, codes, feats, k, radius, maxc, **hds)
        else:
            def job():
                t = time.perf_counter()
                codes, feats = view.stored_query(query_id)
                enc = (time.perf_counter() - t) * 1e3
                return enc, view.search(mode, codes, feats, k, radius, maxc, **hds)

        encode_ms, rec = await _run(job)
        out = {"mode": rec["mode"], "query": query_name, "query_id": query_id, "results": rec["results"],
               "timing_ms": rec["timing_ms"], "encode_ms": round(encode_ms, 3),
               "candidates": rec["candidates"], "truncated": rec["truncated"],
               "k": k, "radius": radius, "max_candidates": maxc,
               **({"hds_mode": rec["hds_mode"], "nprobe": hds["nprobe"], "refine": hds["refine"]}
                  if "hds_mode" in rec else {}),
               **({"examined": rec["examined"]} if "examined" in rec else {}),
               "total_ms": round((time.perf_counter() - t0) * 1e3, 3), "generation": view.generation}
        return SafeJSONResponse(out)

    @app.get("/images/{image_id}", summary="A database image (or its thumbnail) by id",
             responses={200: {"content": {"image/jpeg": {}, "image/png": {}}},
                        404: {"description": "no such image"}})
    async def image(image_id: str = Path(..., description="database id (row number)"),
                    thumb: bool = Query(False, description=f"a JPEG of at most {THUMB_PX} px instead of the original")):
        view = engine.view
        n = parse_int_text(image_id)
        if n is None or n < 0 or image_id != image_id.strip():
            raise _bad(f"the image id must be a non-negative integer, got {image_id[:40]!r}")
        image_id = n
        if not view.is_live(image_id):
            raise HTTPException(404, f"no database image with id {image_id}")
        cache = {"Cache-Control": "public, max-age=3600"}
        try:
            if thumb:
                data = view.cached_thumbnail(image_id) or await _decode(view.thumbnail, image_id)
                return Response(data, media_type="image/jpeg", headers=cache)
            data, media, path = await _decode(view.full_image, image_id)
        except HTTPException:
            raise
        except FileNotFoundError:
            raise HTTPException(404, f"the file of image {image_id} is missing on the server") from None
        except Exception as err:  # noqa: BLE001 - unreadable file on disk
            raise HTTPException(500, f"cannot read image {image_id}: {type(err).__name__}") from None
        if data is None:
            return FileResponse(path, media_type=media, headers=cache)
        return Response(data, media_type=media, headers=cache)

    @app.get("/healthz", summary="Liveness")
    def healthz():
        view = engine.view
        out = {"status": "ok", "count": view.s.count, "live_count": view.s.live_count()}
        if engine.reload_error:
            out["reload_error"] = engine.reload_error
        return out

    @app.get("/info", summary="What the index holds")
    def info():
        return engine.view.info()

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")

    for path, fn in (("/healthz", healthz), ("/", page)):  # monitors that probe with HEAD
        app.add_api_route(path, fn, methods=["HEAD"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def serve_hosts(host: str, allow_hosts=()) -> list[str]:
    """The ``Host`` names a server listening on ``host`` answers to: the loopback names,
    ``host`` itself unless it is a wildcard address (0.0.0.0, ::), and ``allow_hosts``."""
    hosts = list(DEFAULT_ALLOWED_HOSTS)
    if host.strip().lower() not in _WILDCARD_HOSTS:
        hosts.append(host.strip())
    hosts.extend(str(h).strip() for h in allow_hosts if str(h).strip())
    return list(dict.fromkeys(hosts))


def run(index_dir: str, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, request_timeout_s: float = DEFAULT_TIMEOUT_S,
        log_level: str = "info", on_ready: Callable[[str], None] | None = None,
        allow_hosts: tuple[str, ...] | list[str] = (), max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_decodes: int = DEFAULT_MAX_DECODES, max_uploads: int = DEFAULT_MAX_UPLOADS) -> None:
    """Serve ``index_dir`` with uvicorn until interrupted (one process, one search thread).

    The allowed ``Host`` names are the loopback names, the address listened on (unless a
    wildcard such as 0.0.0.0) and ``allow_hosts``. The port is bound before the index
    loads (:func:`listen_socket`); on SIGINT/SIGTERM connections still open after
    ``GRACEFUL_SHUTDOWN_S`` are closed."""
    import uvicorn

    hosts = serve_hosts(host, allow_hosts)
    sock = listen_socket(host, port)  # before the index loads: a busy port is one line, at once
    try:
        app = create_app(index_dir, device, max_upload_bytes, request_timeout_s, allowed_hosts=hosts,
                         max_pixels=max_pixels, max_decodes=max_decodes, max_uploads=max_uploads)
        if on_ready:
            n = app.state.engine.view.s.count
            extra = [h for h in hosts if h not in DEFAULT_ALLOWED_HOSTS]
            names = "any host name" if "*" in hosts else ", ".join(dict.fromkeys(list(DEFAULT_ALLOWED_HOSTS) + extra))
            on_ready(f"serving {n} images from {index_dir} at http://{host}:{port}/ (API docs at /docs; "
                     f"answering to {names})")
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def listen_socket(host: str, port: int):
    """A TCP socket bound to ``host``:``port`` (the first address ``host`` resolves to), or
    :class:`DhfError` with one line (a port in use, an unknown host name, no permission)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        reason = getattr(err, "strerror", None) or err
        raise DhfError(f"cannot listen on {host}:{port}: unknown host ({reason})") from None
    family, stype, proto, _, addr = infos[0]
    sock = socket.socket(family, stype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart without waiting
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.set_inheritable(True)
    except OSError as err:
        sock.close()
        reason = "the port is in use" if err.errno == errno.EADDRINUSE else (err.strerror or str(err)).lower()
        raise DhfError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/css", ".css")
