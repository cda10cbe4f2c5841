"""HDF5 shards, the manifest, and fast feature gathers for reranking.

An index directory::

    manifest.json          format, version, model (file, sha256, backbone, bits), feature
                           dim and dtype, count, shards [{file, rows, start, sha256}],
                           index {type, params, file}, classes, deleted-id file
    model.pt               the model that encoded the database
    codes.index            FAISS binary index (faiss.write_index_binary), ids = row numbers
    shards/part-00000.h5   codes uint8 [n, B], features [n, D] (contiguous, uncompressed,
                           float32 or float16), ids int64, paths utf-8, labels int32

Every file is written under a temporary name and renamed when complete; the manifest
is written last, so an interrupted write never leaves an index that looks whole. The
manifest names the files it uses, so a new generation (``dhf add``) writes new files
and swaps the manifest in one rename: readers see the old or the new index, never a mix.
"""

from __future__ import annotations

import json
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import DhfError
from .model import file_sha256, temp_file

MANIFEST = "manifest.json"
FORMAT = "dhf-index"
FORMAT_VERSION = 1


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync, and rename."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = temp_file(d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_output_path(path: str, what: str, folder: bool = False) -> None:
    """Refuse, before any work is done, an output ``path`` that cannot be written: a folder
    where a file is wanted (or a file where a ``folder`` is), or a path whose nearest existing
    parent is a file or not writable. ``what`` names it in the message (``"-o"``, ``"--output"``)."""
    if not str(path).strip():
        raise DhfError(f"{what} is empty; give a {'folder' if folder else 'file'} path")
    if folder:
        if os.path.exists(path) and not os.path.isdir(path):
            raise DhfError(f"{what} {path} exists and is not a folder")
    elif os.path.isdir(path):
        raise DhfError(f"{what} {path} is a folder; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise DhfError(f"cannot write {what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DhfError(f"cannot write {what} {path}: {parent} is not writable")


def write_manifest(index_dir: str, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (the commit), after :func:`stamp_files`."""
    stamp_files(index_dir, manifest)
    atomic_write_bytes(os.path.join(index_dir, MANIFEST), json.dumps(manifest, indent=2).encode())


def stamp_files(index_dir: str, manifest: dict[str, Any]) -> None:
    """Record the byte size of each file the manifest names (shards, code index, model)
    where the entry has none yet, and the code index's sha256 where missing.

    Called by the writer just before the commit, on the files it has just written (under the
    writer lock), so :func:`check_open` can refuse a truncated, grown or replaced file with a
    ``stat`` instead of reading it. Entries of older manifests without ``size`` stay valid.
    """
    entries = [(os.path.join(index_dir, "shards", s["file"]), s) for s in manifest.get("shards", [])]
    idx = manifest.get("index") or {}
    if idx.get("file"):
        entries.append((os.path.join(index_dir, idx["file"]), idx))
    mod = manifest.get("model") or {}
    if mod.get("file"):
        entries.append((os.path.join(index_dir, mod["file"]), mod))
    fine = manifest.get("fine") or {}
    if fine.get("file"):
        entries.append((os.path.join(index_dir, fine["file"]), fine))
    for path, entry in entries:
        if "size" not in entry and os.path.exists(path):
            entry["size"] = os.path.getsize(path)
    ipath = os.path.join(index_dir, str(idx.get("file")))
    if idx.get("file") and not idx.get("sha256") and os.path.exists(ipath):
        idx["sha256"] = file_sha256(ipath)


def read_manifest(index_dir: str) -> dict[str, Any]:
    """Read and check ``manifest.json`` (:func:`validate_manifest`).

    Raises:
        DhfError: missing directory or manifest, unreadable JSON, another format, a newer
            version, a missing or malformed field (the message names it).
    """
    if not os.path.isdir(index_dir):
        if os.path.exists(index_dir):
            raise DhfError(f"{index_dir} is a file, not an index directory")
        raise DhfError(f"no such index directory: {index_dir}")
    path = os.path.join(index_dir, MANIFEST)
    if not os.path.exists(path):
        raise DhfError(f"{index_dir} is not a dhf index (no {MANIFEST}); build one with `dhf build-index`")
    try:
        with open(path, "rb") as f:
            m = json.loads(f.read())
    except (OSError, ValueError) as err:
        raise DhfError(f"cannot read {path}: {err}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DhfError(f"{path} is not a dhf index manifest")
    version = m.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise DhfError(f"{path}: malformed manifest: 'version' must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise DhfError(f"{index_dir} has index format version {m['version']}; this dhf reads up to {FORMAT_VERSION}")
    problems = validate_manifest(m)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise DhfError(f"{path}: malformed manifest: {problems[0]}{more}; run `dhf verify {index_dir}`")
    return m


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _plain_name(v: Any) -> bool:
    """A file name the manifest may use: a non-empty string without directory parts."""
    return (isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and os.sep not in v
            and "\0" not in v)


def validate_manifest(m: dict[str, Any]) -> list[str]:
    """One line per missing or malformed manifest field, naming the key (empty: well formed).

    Checks types and ranges of what readers and writers index into: ``bits`` (positive
    multiple of 8), ``count``, ``feature_dim``, ``feature_dtype`` (float32/float16),
    ``shards`` (file names without directory parts, ``rows``, ``start`` = the running row
    total, ``sha256``), ``index`` (``file``), ``model`` (``file`` or null, ``sha256``),
    ``classes`` (strings), ``deleted`` (unique ids in ``0..count-1``), ``skipped_file``,
    ``fine`` (optional: ``file``, ``sha256``, ``storage``, ``cell_size``, ``rows``).
    """
    p: list[str] = []

    def need(key: str, ok, what: str, obj=m, name=None) -> bool:
        name = name or repr(key)
        if key not in obj:
            p.append(f"missing key {name}")
            return False
        if not ok(obj[key]):
            p.append(f"key {name} must be {what}, got {obj[key]!r:.60}")
            return False
        return True

    need("bits", lambda v: _is_int(v) and v > 0 and v % 8 == 0, "a positive multiple of 8")
    count_ok = need("count", lambda v: _is_int(v) and v >= 0, "a non-negative integer")
    need("feature_dim", lambda v: _is_int(v) and v > 0, "a positive integer")
    need("feature_dtype", lambda v: v in ("float32", "float16"), "'float32' or 'float16'")
    if need("shards", lambda v: isinstance(v, list), "a list"):
        start, rows_known = 0, True
        for j, s in enumerate(m["shards"]):
            key = f"'shards'[{j}]"
            if not isinstance(s, dict):
                p.append(f"key {key} must be an object, got {s!r:.60}")
                rows_known = False
                continue
            need("file", _plain_name, "a file name without directory parts", s, f"{key}.file")
            rows_ok = need("rows", lambda v: _is_int(v) and v >= 0, "a non-negative integer", s, f"{key}.rows")
            need("sha256", lambda v: isinstance(v, str), "a string", s, f"{key}.sha256")
            if "start" in s and rows_known and s["start"] != start:
                p.append(f"key {key}.start is {s['start']!r:.20}, expected {start} (the rows before it)")
            if "size" in s and not (_is_int(s["size"]) and s["size"] >= 0):
                p.append(f"key {key}.size must be a non-negative integer, got {s['size']!r:.60}")
            rows_known &= rows_ok
            start += s["rows"] if rows_ok else 0
        if count_ok and rows_known and start != m["count"]:
            p.append(f"key 'count' is {m['count']}, the shards hold {start} rows")
    if need("index", lambda v: isinstance(v, dict), "an object"):
        ix = m["index"]
        need("file", _plain_name, "a file name without directory parts", ix, "'index'.file")
        from .index import INDEX_KINDS

        if "type" in ix and ix["type"] not in INDEX_KINDS:
            p.append(f"key 'index'.type must be one of {', '.join(INDEX_KINDS)}, got {ix['type']!r:.60}")
        for k in ("b", "nhash", "nflip"):
            if ix.get(k) is not None and not _is_int(ix[k]):
                p.append(f"key 'index'.{k} must be an integer, got {ix[k]!r:.60}")
        if ix.get("sha256") is not None and not isinstance(ix["sha256"], str):
            p.append(f"key 'index'.sha256 must be a string, got {ix['sha256']!r:.60}")
    if need("model", lambda v: isinstance(v, dict), "an object"):
        mod = m["model"]
        if mod.get("file") is not None:
            if _plain_name(mod["file"]):
                need("sha256", lambda v: isinstance(v, str), "a string", mod, "'model'.sha256")
            else:
                p.append(f"key 'model'.file must be a file name without directory parts, got {mod['file']!r:.60}")
    if "classes" in m and not (isinstance(m["classes"], list) and all(isinstance(c, str) for c in m["classes"])):
        p.append(f"key 'classes' must be a list of strings, got {m['classes']!r:.60}")
    if m.get("skipped_file") is not None and not _plain_name(m["skipped_file"]):
        p.append(f"key 'skipped_file' must be a file name without directory parts, got {m['skipped_file']!r:.60}")
    fine = m.get("fine")
    if fine is not None:
        if not isinstance(fine, dict):
            p.append(f"key 'fine' must be an object or null, got {fine!r:.60}")
        else:
            need("file", _plain_name, "a file name without directory parts", fine, "'fine'.file")
            need("sha256", lambda v: isinstance(v, str), "a string", fine, "'fine'.sha256")
            need("storage", lambda v: v in ("pq4", "sq8", "fp16"), "'pq4', 'sq8' or 'fp16'", fine, "'fine'.storage")
            need("cell_size", lambda v: _is_int(v) and v > 0, "a positive integer", fine, "'fine'.cell_size")
            need("rows", lambda v: _is_int(v) and v >= 0, "a non-negative integer", fine, "'fine'.rows")
            if "size" in fine and not (_is_int(fine["size"]) and fine["size"] >= 0):
                p.append(f"key 'fine'.size must be a non-negative integer, got {fine['size']!r:.60}")
    deleted = m.get("deleted")
    if deleted is not None:
        if not (isinstance(deleted, list) and all(_is_int(i) for i in deleted)):
            p.append(f"key 'deleted' must be a list of integer ids, got {deleted!r:.60}")
        elif count_ok:
            bad = [i for i in deleted if not 0 <= i < m["count"]]
            if bad:
                p.append(f"key 'deleted' holds id {bad[0]}, out of range 0..{m['count'] - 1}"
                         + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    return p


class ShardFile:
    """One HDF5 shard written as its rows arrive, made atomic by :meth:`commit`.

    The build streams the codes and features into the shard's temporary file while later
    batches are still encoding, so a shard's rows are never held in memory whole (issue 12:
    peak memory of a 50,000 x 1280 float32 shard 494 -> ~150 MB; the time after the last batch,
    the fsync and the sha256, did not change on the H200: docs/scaling.md).

    Args:
        path: the shard's final name; the rows go to a ``.tmp-*.h5`` file beside it.
        rows: rows the shard will have if every row comes (:meth:`commit` with fewer rows
            rewrites the file at its true size: a build's skipped images).
        code_bytes: B of codes uint8 [n, B]; dim, dtype: features [n, dim] of ``dtype``
            (float32 or float16).
    """

    def __init__(self, path: str, rows: int, code_bytes: int, dim: int, dtype) -> None:
        import h5py

        self.path, self.rows, self.n = path, int(rows), 0
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, self.tmp = temp_file(d, ".h5")
        os.close(fd)
        try:
            self.f = h5py.File(self.tmp, "w")
            self.codes = self.f.create_dataset("codes", (self.rows, code_bytes), np.uint8)
            # contiguous and uncompressed: rows can be memory-mapped for reranking
            self.features = self.f.create_dataset("features", (self.rows, dim), np.dtype(dtype))
        except BaseException:
            self.abort()
            raise

    def append(self, codes: np.ndarray, features: np.ndarray) -> None:
        """The next rows: codes uint8 [b, B], features [b, dim] (cast to the shard's dtype)."""
        b = len(codes)
        if len(features) != b:
            raise ValueError("shard arrays differ in length")
        if self.n + b > self.rows:
            raise ValueError(f"shard {self.path}: more than its {self.rows} rows")
        if b:
            self.codes[self.n:self.n + b] = np.ascontiguousarray(codes, dtype=np.uint8)
            self.features[self.n:self.n + b] = np.ascontiguousarray(features, dtype=self.features.dtype)
        self.n += b

    def commit(self, ids: np.ndarray, paths: Sequence[str], labels: np.ndarray) -> dict[str, Any]:
        """Write ids int64 [n], paths (n strings) and labels int32 [n] for the n rows appended,
        fsync, hash and rename the file to its final name.

        Returns:
            ``{"file": basename, "rows": n, "sha256": ...}``.
        """
        import h5py

        n = self.n
        if not (len(ids) == len(paths) == len(labels) == n):
            raise ValueError("shard arrays differ in length")
        try:
            if n < self.rows:  # rows were skipped: the same file at its true size
                self._shrink()
            self.f.create_dataset("ids", data=np.asarray(ids, dtype=np.int64))
            self.f.create_dataset("labels", data=np.asarray(labels, dtype=np.int32))
            enc = [p.encode("utf-8", "surrogateescape") for p in paths]
            self.f.create_dataset("paths", data=np.array(enc, dtype=object), dtype=h5py.string_dtype("utf-8"))
            self.f.close()
            with open(self.tmp, "rb+") as f, ThreadPoolExecutor(1, thread_name_prefix="dhf-fsync") as ex:
                synced = ex.submit(os.fsync, f.fileno())  # the hash reads the page cache meanwhile
                sha = file_sha256(self.tmp)
                synced.result()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return {"file": os.path.basename(self.path), "rows": int(n), "sha256": sha}

    def _shrink(self) -> None:
        """Copy the ``n`` rows appended into a new temporary file of ``n`` rows."""
        import h5py

        shape, dtype = (self.codes.shape[1], self.features.shape[1]), self.features.dtype
        self.f.close()
        smaller = ShardFile(self.path, self.n, *shape, dtype)
        try:
            with h5py.File(self.tmp, "r") as old:
                for a in range(0, self.n, _COPY_ROWS):
                    b = min(self.n, a + _COPY_ROWS)
                    smaller.append(old["codes"][a:b], old["features"][a:b])
        except BaseException:
            smaller.abort()
            raise
        os.unlink(self.tmp)
        self.f, self.tmp, self.codes, self.features = smaller.f, smaller.tmp, smaller.codes, smaller.features
        self.rows = self.n

    def abort(self) -> None:
        """Close and remove the temporary file (the final name is never touched)."""
        f = getattr(self, "f", None)
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 -- already closed, or its file is gone
                pass
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


_COPY_ROWS = 65_536  # rows a time when :meth:`ShardFile.commit` rewrites a shard at its true size


def write_shard(
    path: str,
    codes: np.ndarray,
    features: np.ndarray,
    ids: np.ndarray,
    paths: Sequence[str],
    labels: np.ndarray,
) -> dict[str, Any]:
    """Write one HDF5 shard atomically (a :class:`ShardFile` given every row at once).

    Args:
        codes: uint8 [n, B]; features: float32/float16 [n, D]; ids: int64 [n];
            paths: n strings; labels: int32 [n].
    Returns:
        ``{"file": basename, "rows": n, "sha256": ...}``.
    """
    n = len(codes)
    if not (len(features) == len(ids) == len(paths) == len(labels) == n):
        raise ValueError("shard arrays differ in length")
    codes, features = np.asarray(codes), np.asarray(features)
    sf = ShardFile(path, n, codes.shape[1], features.shape[1], features.dtype)
    try:
        sf.append(codes, features)
    except BaseException:
        sf.abort()
        raise
    return sf.commit(ids, paths, labels)


def read_shard(path: str) -> dict[str, np.ndarray]:
    """Read a whole shard: codes, features, ids, labels, paths (list of str)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            out = {k: f[k][()] for k in ("codes", "features", "ids", "labels")}
            out["paths"] = [_decode_path(p) for p in f["paths"][()]]
    except (OSError, KeyError) as err:
        raise DhfError(f"cannot read shard {path}: {err}") from None
    return out


def _decode_path(p) -> str:
    if isinstance(p, bytes):
        return p.decode("utf-8", "surrogateescape")
    return str(p)


@dataclass
class _ShardView:
    file: str
    start: int
    rows: int
    memmap: np.ndarray | None  # features [rows, D] mapped from the file, when contiguous


class FeatureStore:
    """Read access to an index directory's shards.

    ``codes()`` loads all codes (uint8 [n, B]: small, kept in RAM); features stay on
    disk and are gathered by id (memory-mapped contiguous datasets, sorted reads).
    """

    def __init__(self, index_dir: str, manifest: dict[str, Any]):
        self.index_dir = index_dir
        self.manifest = manifest
        self.count = int(manifest["count"])
        self.dim = int(manifest["feature_dim"])
        self.dtype = np.dtype(manifest["feature_dtype"])
        self.shards: list[_ShardView] = []
        start = 0
        for s in manifest["shards"]:
            self.shards.append(_ShardView(os.path.join(index_dir, "shards", s["file"]), start, int(s["rows"]), None))
            start += int(s["rows"])
        if start != self.count:
            raise DhfError(f"{index_dir}: shards hold {start} rows, the manifest says {self.count}")
        self._starts = np.array([s.start for s in self.shards] + [self.count], dtype=np.int64)
        self._paths: list[str] | None = None
        self._labels: np.ndarray | None = None
        self._features: np.ndarray | None = None
        self.prefetch = True  # gather: MADV_WILLNEED the requested rows before copying them

    # -- whole columns ------------------------------------------------------------------
    def _column(self, name: str) -> list[np.ndarray]:
        import h5py

        out = []
        for s in self.shards:
            try:
                with h5py.File(s.file, "r") as f:
                    out.append(f[name][()])
            except (OSError, KeyError) as err:
                raise DhfError(f"cannot read {name} from shard {s.file}: {err}") from None
        return out

    def codes(self) -> np.ndarray:
        """uint8 [n, B]: every code, in id order."""
        cols = self._column("codes")
        nb = int(self.manifest["bits"]) // 8
        return np.concatenate(cols) if cols else np.zeros((0, nb), np.uint8)

    def labels(self) -> np.ndarray:
        """int32 [n]."""
        if self._labels is None:
            cols = self._column("labels")
            self._labels = np.concatenate(cols).astype(np.int32) if cols else np.zeros(0, np.int32)
        return self._labels

    def paths(self) -> list[str]:
        """n image paths, in id order."""
        if self._paths is None:
            self._paths = [_decode_path(p) for col in self._column("paths") for p in col]
        return self._paths

    def features_in_ram(self) -> np.ndarray | None:
        """The features as a C-contiguous float32 array when they are loaded in RAM (searches
        may read them in place), else None."""
        f = self._features
        return f if f is not None and f.dtype == np.float32 and f.flags.c_contiguous else None

    def load_features(self) -> np.ndarray:
        """Every feature row in RAM: float32/float16 [n, D] (for ES and benchmarks)."""
        if self._features is None:
            cols = self._column("features")
            self._features = np.concatenate(cols) if cols else np.zeros((0, self.dim), self.dtype)
        return self._features

    def iter_feature_shards(self) -> Iterable[tuple[int, np.ndarray]]:
        """Yield (first id, features [rows, D]) shard by shard (bounded memory)."""
        if self._features is not None:
            yield 0, self._features
            return
        for s in self.shards:
            mm = self._mapped(s)
            yield s.start, mm if mm is not None else self._column_one(s, "features")

    def _column_one(self, s: _ShardView, name: str) -> np.ndarray:
        import h5py

        with h5py.File(s.file, "r") as f:
            return f[name][()]

    # -- row gathers -------------------------------------------------------------------
    def _mapped(self, s: _ShardView) -> np.ndarray | None:
        """Memory-map a shard's contiguous, uncompressed feature dataset (None if not possible)."""
        if s.memmap is not None:
            return s.memmap
        import h5py

        try:
            with h5py.File(s.file, "r") as f:
                ds = f["features"]
                offset = ds.id.get_offset()
                ok = ds.chunks is None and ds.compression is None and offset is not None
                shape, dtype = ds.shape, ds.dtype
        except (OSError, KeyError) as err:
            raise DhfError(f"cannot read features from shard {s.file}: {err}") from None
        if not ok or shape[0] == 0:
            return None
        s.memmap = np.memmap(s.file, dtype=dtype, mode="r", offset=offset, shape=shape)
        mm = getattr(s.memmap, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            # scattered rows: no kernel readahead around each fault (it read ~30x more than
            # needed on cold gathers); _prefetch asks for exactly the rows instead
            try:
                mm.madvise(mmap.MADV_RANDOM)
            except OSError:
                pass
        return s.memmap

    @staticmethod
    def _prefetch(mm: np.memmap, local: np.ndarray) -> None:
        """MADV_WILLNEED for the pages of rows ``local`` (sorted): the kernel reads them
        in parallel instead of one blocking page fault per row on a cold page cache."""
        raw = getattr(mm, "_mmap", None)
        if raw is None or not hasattr(raw, "madvise") or not hasattr(mmap, "MADV_WILLNEED"):
            return
        page = mmap.PAGESIZE
        base = mm.offset % mmap.ALLOCATIONGRANULARITY  # where row 0 starts inside the mapping
        row = mm.strides[0]
        a = (base + local * row) // page * page
        b = base + (local + 1) * row
        # merge rows whose page ranges touch: one madvise per run
        brk = np.flatnonzero(a[1:] > b[:-1]) + 1
        starts, ends = a[np.concatenate([[0], brk])], b[np.concatenate([brk - 1, [len(b) - 1]])]
        size = len(raw)
        try:
            for st, en in zip(starts.tolist(), ends.tolist()):
                raw.madvise(mmap.MADV_WILLNEED, st, min(en, size) - st)
        except (OSError, ValueError):
            pass

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Feature rows for ``ids`` (int64 [m], any order, repeats allowed) -> [m, D] in that order."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=self.dtype)
        if len(ids) == 0:
            return out
        if self._features is not None:
            return self._features[ids]
        if ids.min() < 0 or ids.max() >= self.count:
            raise DhfError("feature id out of range")
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        shard_of = np.searchsorted(self._starts, sorted_ids, side="right") - 1
        bounds = np.searchsorted(shard_of, np.arange(len(self.shards) + 1))
        for si, s in enumerate(self.shards):
            a, b = bounds[si], bounds[si + 1]
            if a == b:
                continue
            local = sorted_ids[a:b] - s.start
            mm = self._mapped(s)
            if mm is not None:
                if self.prefetch and b - a >= 32:
                    self._prefetch(mm, local)
                out[order[a:b]] = mm[local]
            else:  # chunked/compressed datasets: h5py read of sorted unique rows
                import h5py

                uniq, inv = np.unique(local, return_inverse=True)
                with h5py.File(s.file, "r") as f:
                    rows = f["features"][uniq]
                out[order[a:b]] = rows[inv]
        return out


def verify_shard_checksums(index_dir: str, manifest: dict[str, Any]) -> list[str]:
    """Return one problem line per shard whose file is missing or whose sha256/rows differ."""
    import h5py

    problems = []
    for s in manifest["shards"]:
        p = os.path.join(index_dir, "shards", s["file"])
        if not os.path.exists(p):
            problems.append(f"shard {s['file']}: missing")
            continue
        if file_sha256(p) != s["sha256"]:
            problems.append(f"shard {s['file']}: checksum mismatch (modified or truncated)")
            continue
        try:
            with h5py.File(p, "r") as f:
                rows = {k: len(f[k]) for k in ("codes", "features", "ids", "labels", "paths")}
        except (OSError, KeyError) as err:
            problems.append(f"shard {s['file']}: unreadable ({err})")
            continue
        if set(rows.values()) != {int(s["rows"])}:
            problems.append(f"shard {s['file']}: row counts {rows} differ from manifest {s['rows']}")
    return problems


# Checked on every open (Searcher): sizes always, sha256 of the code index up to this size
# (hashing runs at ~0.9 GB/s on the 2-core dev machine: 64 MiB ~ 70 ms; docs/reliability.md).
OPEN_HASH_LIMIT = 64 << 20


def check_open(index_dir: str, manifest: dict[str, Any], hash_limit: int = OPEN_HASH_LIMIT,
               full: bool = False) -> None:
    """Cheap integrity checks before an index is searched.

    Every shard, the code index and the fine index (when there is one) must exist and have
    the byte size the manifest recorded (:func:`stamp_files`; entries of older manifests
    without ``size`` are not size-checked); the code index's and the fine index's sha256 are
    checked when the file is at most ``hash_limit`` bytes.
    ``full``: also check every shard's sha256 (the cost of reading the whole index once).
    The model is checked when it is loaded (:func:`checked_model_path`).

    Raises:
        DhfError: one line naming the file and what differs, pointing to ``dhf verify``.
    """
    hint = f"run `dhf verify {index_dir}`"
    for s in manifest["shards"]:
        path = os.path.join(index_dir, "shards", s["file"])
        _check_size(index_dir, path, s, f"shard {s['file']}", hint)
        if full and file_sha256(path) != s["sha256"]:
            raise DhfError(f"{index_dir}: shard {s['file']} does not match its checksum in the manifest "
                           f"(modified or replaced); {hint}")
    ix = manifest["index"]
    path = os.path.join(index_dir, ix["file"])
    size = _check_size(index_dir, path, ix, f"code index {ix['file']}", hint)
    if ix.get("sha256") and (full or size <= hash_limit) and file_sha256(path) != ix["sha256"]:
        raise DhfError(f"{index_dir}: code index {ix['file']} does not match its checksum in the manifest "
                       f"(modified or replaced); {hint}")
    fine = manifest.get("fine")
    if fine:
        check_fine_file(index_dir, fine, hash_limit, full)


def check_fine_file(index_dir: str, fine: dict[str, Any], hash_limit: int = OPEN_HASH_LIMIT,
                    full: bool = False) -> str:
    """The fine index's path after checking its size and (when at most ``hash_limit`` bytes,
    or ``full``) its sha256 against the manifest entry ``fine``.

    Raises:
        DhfError: missing, truncated, modified or replaced (one line)."""
    hint = f"run `dhf verify {index_dir}`"
    path = os.path.join(index_dir, fine["file"])
    size = _check_size(index_dir, path, fine, f"fine index {fine['file']}", hint)
    if (full or size <= hash_limit) and file_sha256(path) != fine.get("sha256"):
        raise DhfError(f"{index_dir}: fine index {fine['file']} does not match its checksum in the manifest "
                       f"(modified or replaced); {hint}")
    return path


def _check_size(index_dir: str, path: str, entry: dict[str, Any], what: str, hint: str) -> int:
    try:
        size = os.path.getsize(path)
    except OSError:
        raise DhfError(f"{index_dir}: {what} is missing; {hint}") from None
    if "size" in entry and size != entry["size"]:
        raise DhfError(f"{index_dir}: {what} is {size} bytes, the manifest recorded {entry['size']} (truncated, modified or "
                       f"replaced); {hint}")
    return size


def checked_code_index_path(index_dir: str, manifest: dict[str, Any]) -> str:
    """The code index's path after a full sha256 check (writers call it before rewriting
    from it: ``dhf add`` appends to it).

    Raises:
        DhfError: missing, or its sha256/size differs from the manifest's.
    """
    ix = manifest["index"]
    check_open(index_dir, {"shards": [], "index": ix}, full=True)
    return os.path.join(index_dir, ix["file"])


def checked_model_path(index_dir: str, manifest: dict[str, Any]) -> str:
    """The index's own model file after checking its size and sha256 against the manifest
    (~20 ms for a small model; a replaced ``model.pt`` would silently change every query code).

    Raises:
        DhfError: no model (built from arrays), missing, or another file than the one indexed.
    """
    mod = manifest["model"]
    if not mod.get("file"):
        raise DhfError(f"{index_dir} has no model: it was built from arrays; search it by codes")
    path = os.path.join(index_dir, mod["file"])
    _check_size(index_dir, path, mod, f"model {mod['file']}", f"run `dhf verify {index_dir}`")
    if file_sha256(path) != mod.get("sha256"):
        raise DhfError(f"{index_dir}: model {mod['file']} is not the model the index was built with (its sha256 "
                       f"differs from the manifest's: modified or replaced); run `dhf verify {index_dir}`")
    return path


def is_index_model(manifest: dict[str, Any], model_path: str) -> bool:
    """Whether the checkpoint ``model_path`` is the index's own model (same sha256).

    Raises:
        DhfError: the file does not exist.
    """
    if not os.path.isfile(model_path):
        raise DhfError(f"model file not found: {model_path}")
    return file_sha256(model_path) == (manifest.get("model") or {}).get("sha256")


def other_model_error(manifest: dict[str, Any], model_path: str, option: str = "--allow-other-model") -> DhfError:
    """The refusal for a model of the right width but other weights than the index's."""
    sha, want = file_sha256(model_path), (manifest.get("model") or {}).get("sha256")
    theirs = f"{want[:12]}…" if want else "none recorded"
    return DhfError(f"{model_path} is not the model this index was built with (sha256 {sha[:12]}… vs {theirs}): "
                    f"its codes would not be comparable; pass {option} to use it anyway")


def canonical_path(p: str) -> str:
    """The one form in which image paths are stored and compared (``build-index``, ``add``,
    ``remove --paths``): absolute and normalised (``os.path.abspath``). Symlinks are not
    resolved: a link and its target are different paths, as they were indexed."""
    return os.path.abspath(p)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
