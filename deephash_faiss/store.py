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
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import DhfError
from .model import file_sha256

MANIFEST = "manifest.json"
FORMAT = "dhf-index"
FORMAT_VERSION = 1


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync, and rename."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
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


def write_manifest(index_dir: str, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(os.path.join(index_dir, MANIFEST), json.dumps(manifest, indent=2).encode())


def read_manifest(index_dir: str) -> dict[str, Any]:
    """Read and check ``manifest.json``.

    Raises:
        DhfError: missing directory or manifest, unreadable JSON, another format, a newer version.
    """
    if not os.path.isdir(index_dir):
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
    if int(m.get("version", 0)) > FORMAT_VERSION:
        raise DhfError(f"{index_dir} has index format version {m['version']}; this dhf reads up to {FORMAT_VERSION}")
    return m


def write_shard(
    path: str,
    codes: np.ndarray,
    features: np.ndarray,
    ids: np.ndarray,
    paths: Sequence[str],
    labels: np.ndarray,
) -> dict[str, Any]:
    """Write one HDF5 shard atomically.

    Args:
        codes: uint8 [n, B]; features: float32/float16 [n, D]; ids: int64 [n];
        paths: n strings; labels: int32 [n].
    Returns:
        ``{"file": basename, "rows": n, "sha256": ...}``.
    """
    import h5py

    n = len(codes)
    if not (len(features) == len(ids) == len(paths) == len(labels) == n):
        raise ValueError("shard arrays differ in length")
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".h5", dir=d)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("codes", data=np.ascontiguousarray(codes, dtype=np.uint8))
            # contiguous and uncompressed: rows can be memory-mapped for reranking
            f.create_dataset("features", data=np.ascontiguousarray(features))
            f.create_dataset("ids", data=np.asarray(ids, dtype=np.int64))
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int32))
            enc = [p.encode("utf-8", "surrogateescape") for p in paths]
            f.create_dataset("paths", data=np.array(enc, dtype=object), dtype=h5py.string_dtype("utf-8"))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        sha = file_sha256(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"file": os.path.basename(path), "rows": int(n), "sha256": sha}


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


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
