"""Finding and decoding images.

An image collection is a folder. If its top level has subfolders, each subfolder is a
class (label = index of the sorted subfolder name) and every image below it, at any
depth, belongs to it; images directly in the root are unlabelled (label -1). Without
subfolders every image is unlabelled.

Every image is decoded the same way for training, indexing and querying: PIL decode,
converted to 8-bit RGB, shorter side resized to ``load_size`` and centre-cropped to a
``load_size`` x ``load_size`` square. The model then resizes that square to its input
size on the device (:meth:`deephash_faiss.model.HashNet.preprocess`).

A JPEG already at the load size (shorter side == ``load_size``, e.g. CIFAR-10's 32 px files)
needs no resampling, only decoding and the crop; where torch is loaded, such files are decoded
by torchvision's libjpeg-turbo operator instead of PIL (4x faster per image: PIL's per-file
overhead, not the decode, is most of a 32-px image's time). That path is used only after a
self-check shows it gives PIL's pixels exactly on this machine, and any file it declines or
fails on goes through PIL, so the output (and every skip reason) is PIL's either way
(:func:`as_is_jpeg`).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .errors import DhfError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
# Names that look like images but are not decoded (vector, camera raw, HEIF/AVIF/JPEG XL,
# layered editor files, icons...): listed in the skip report instead of vanishing silently.
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset(
    {".svg", ".svgz", ".eps", ".ai", ".pdf", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".jpx", ".jfif",
     ".ico", ".icns", ".cur", ".psd", ".xcf", ".kra", ".tga", ".pcx", ".dds", ".exr", ".hdr", ".raw", ".dng",
     ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf"}
)
# The only PIL decoders dhf runs, whatever a file's name or first bytes claim: the raster formats
# of IMAGE_EXTENSIONS (JPEG also opens multi-picture MPO files). PIL would otherwise sniff any of its plugins,
# EPS among them, which runs Ghostscript on the file's PostScript.
PIL_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
NOT_AN_IMAGE = "not an image dhf reads (JPEG, PNG, BMP, GIF, WebP, TIFF, PPM)"


class ImageDecodeError(Exception):
    """An image that cannot be used; ``str(err)`` is the one-line reason."""


class ImageTooLargeError(ImageDecodeError):
    """An image over the pixel limit (PIL's decompression-bomb limit or ``max_pixels``),
    refused from its header, before its pixels are decoded."""


@dataclass
class ImageList:
    """Images found under a root folder.

    Attributes:
        root: the folder that was scanned.
        paths: image file paths, sorted, length n.
        labels: int32 [n], class index or -1 when unlabelled.
        classes: class names; ``labels`` index into it.
        skipped: ``(path, reason)`` for entries that are not usable files
            (broken links, unreadable directories).
    """

    root: str
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return bool(self.classes) and bool(len(self.labels)) and bool((self.labels >= 0).all())

    def unlabelled_reason(self) -> str:
        """Why these images cannot train with labels (a phrase), or "" when they can (two or
        more classes, every image in one)."""
        loose = int((self.labels < 0).sum()) if len(self.labels) else 0
        if not self.classes:
            return "the folder has no class subfolders"
        if loose:
            return (f"{loose} of its {len(self.labels)} images lie directly in the folder, outside the class "
                    f"subfolders: move them into one to train with labels")
        if len(self.classes) < 2:
            return f"the folder has one class subfolder, {self.classes[0]}: labels need at least two"
        return ""


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def unsupported_image_reason(name: str) -> str | None:
    """The skip-report reason for a name with an image-like extension that dhf does not
    decode (``x.svg`` -> ``"unsupported image format (.svg)..."``), else None."""
    ext = os.path.splitext(name)[1].lower()
    if ext not in UNSUPPORTED_IMAGE_EXTENSIONS:
        return None
    return f"unsupported image format ({ext}): dhf indexes {', '.join(sorted(IMAGE_EXTENSIONS))}"


def _walk_images(top: str, skipped: list[tuple[str, str]]) -> list[str]:
    found = []

    def onerror(err: OSError) -> None:
        skipped.append((str(err.filename), f"cannot read directory: {err.strerror}"))

    for dirpath, dirnames, filenames in os.walk(top, onerror=onerror, followlinks=False):
        dirnames.sort()
        for name in dirnames:  # reported, never followed (a link to a parent would loop)
            if os.path.islink(os.path.join(dirpath, name)):
                skipped.append((os.path.join(dirpath, name), "symbolic link to a directory: not followed"))
        for name in sorted(filenames):
            if not is_image_name(name):
                reason = unsupported_image_reason(name)
                if reason:
                    skipped.append((os.path.join(dirpath, name), reason))
                continue
            path = os.path.join(dirpath, name)
            try:  # one stat a file (was exists + isfile: two; 200,000 files 1.7 s -> see docs/scaling.md)
                mode = os.stat(path).st_mode
            except (OSError, ValueError):
                skipped.append((path, _bad_link_reason(path)))
                continue
            if not stat.S_ISREG(mode):
                skipped.append((path, "not a regular file"))
                continue
            found.append(path)
    return found


def _bad_link_reason(path: str) -> str:
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop"
        if isinstance(err, PermissionError):
            return "permission denied"
    return "broken symbolic link"


def scan_images(root: str | os.PathLike) -> ImageList:
    """Find images under ``root`` (recursively), labelled by top-level subfolder.

    Paths come back in the form the index stores, :func:`deephash_faiss.store.canonical_path`
    (absolute, normalised, symlinks not resolved), whatever the working directory.

    Raises:
        DhfError: ``root`` does not exist or is not a directory.
    """
    from .store import canonical_path

    root = os.fspath(root)
    if not os.path.exists(root):
        raise DhfError(f"no such folder: {root}")
    if not os.path.isdir(root):
        raise DhfError(f"not a folder: {root}")
    root = canonical_path(root)
    skipped: list[tuple[str, str]] = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as err:
        raise DhfError(f"cannot read folder {root}: {err.strerror}") from None
    paths: list[str] = []
    labels: list[int] = []
    classes: list[str] = []
    for entry in entries:
        if entry.is_file() and is_image_name(entry.name):
            paths.append(entry.path)
            labels.append(-1)
        elif entry.is_symlink() and not os.path.exists(entry.path) and is_image_name(entry.name):
            skipped.append((entry.path, _bad_link_reason(entry.path)))
        elif entry.is_symlink() and entry.is_dir():
            skipped.append((entry.path, "symbolic link to a directory: not followed"))
        elif not entry.is_dir() and unsupported_image_reason(entry.name):
            skipped.append((entry.path, unsupported_image_reason(entry.name)))
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            found = _walk_images(entry.path, skipped)
            if found:
                label = len(classes)
                classes.append(entry.name)
                paths.extend(found)
                labels.extend([label] * len(found))
    return ImageList(root, paths, np.asarray(labels, dtype=np.int32), classes, skipped)


def scan_inputs(items: Sequence[str | os.PathLike]) -> list[str]:
    """Expand query arguments (files or folders) into a list of image paths.

    Raises:
        DhfError: an item does not exist, or a folder holds no images.
    """
    out: list[str] = []
    for item in items:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = scan_images(item).paths
            if not found:
                raise DhfError(f"no images found in folder {item}")
            out.extend(found)
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise DhfError(f"no such file: {item}")
    return out


def check_pixels(img, max_pixels: int | None = None) -> None:
    """Refuse an opened (not yet loaded) PIL image with more pixels than allowed.

    The limit is ``max_pixels`` when given, else PIL's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``); the smaller of the two applies. PIL only warns between
    1x and 2x its limit; this refuses explicitly (``warnings.catch_warnings`` is not
    thread-safe, and decoding runs in threads).

    Raises:
        ImageTooLargeError: ``img.size`` (from the header; after a JPEG draft, the reduced
            size) has more pixels than the limit.
    """
    from PIL import Image

    pil_limit = Image.MAX_IMAGE_PIXELS
    n = img.size[0] * img.size[1]
    if pil_limit and n > pil_limit and (max_pixels is None or pil_limit <= max_pixels):
        raise ImageTooLargeError(f"image too large (decompression bomb limit): {img.size[0]}x{img.size[1]} "
                                 f"pixels exceeds PIL's limit of {pil_limit}")
    if max_pixels is not None and n > max_pixels:
        raise ImageTooLargeError(f"image too large: {img.size[0]}x{img.size[1]} = {n} pixels exceeds the limit of "
                                 f"{max_pixels} pixels")


# A decode of this many pixels or more hands freed memory back to the OS afterwards.
_TRIM_PIXELS = 4_000_000


def decode_image(source: str | bytes, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode one image (a file path, or the encoded bytes of an upload) to uint8
    [size, size, 3] RGB: EXIF orientation applied, 8-bit RGB, shorter side resized to
    ``size`` (bilinear), centre crop.

    Memory: a JPEG is reduced while decoding (``Image.draft``: DCT scaling by 1/2, 1/4 or
    1/8, never below ``size``); the pixel count is checked from the header (after the
    draft) before anything is decoded; grayscale images are resized before they become
    RGB; the full-size raster is released as soon as it is resized, and after a large
    decode the C heap is trimmed so the process's memory goes back down.

    Args:
        source: a path, or the encoded bytes.
        size: output side in pixels.
        max_pixels: refuse images whose decoded raster would have more pixels than this
            (None: only PIL's decompression-bomb limit, ``Image.MAX_IMAGE_PIXELS``).
    Raises:
        ImageTooLargeError: over the pixel limit (checked before decoding).
        ImageDecodeError: the file is missing, empty, truncated, not an image or
            otherwise unusable.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    _quiet_bomb_warnings()
    pixels = 0
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if not len(source):
                raise ImageDecodeError("empty file")
            encoded = source
        else:
            nbytes = os.path.getsize(source)
            if nbytes == 0:
                raise ImageDecodeError("empty file")
            encoded = None
            if nbytes <= _as_is_max_bytes(size) and as_is_jpeg_enabled():  # larger files are not at the load size
                with open(source, "rb") as f:
                    encoded = f.read()
        if encoded is not None and as_is_jpeg_enabled():
            arr = as_is_jpeg(encoded, size, max_pixels)
            if arr is not None:
                return arr
        opened = io.BytesIO(encoded) if encoded is not None else source
        with Image.open(opened, formats=PIL_FORMATS) as raw:
            reduce_while_decoding(raw, size)
            check_pixels(raw, max_pixels)
            pixels = raw.size[0] * raw.size[1]
            raw.load()
            img = exif_oriented(raw)
            try:
                arr = _rgb_square(img, size)
            finally:
                if img is not raw:
                    img.close()
                raw.close()  # frees the full-size raster now, not when the caller lets go
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"image too large (decompression bomb limit): {err}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(NOT_AN_IMAGE) from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except MemoryError:
        raise ImageDecodeError("out of memory decoding this image") from None
    except Exception as err:  # noqa: BLE001 - crafted files raise anything (struct.error, IndexError...)
        raise ImageDecodeError(one_line(f"cannot decode: {err}" if isinstance(err, (OSError, ValueError, SyntaxError,
                                        EOFError)) else f"cannot decode: {type(err).__name__}: {err}")) from None
    finally:
        if pixels >= _TRIM_PIXELS:
            release_memory()
    if arr.shape != (size, size, 3):
        raise ImageDecodeError(f"unexpected decoded shape {arr.shape}")
    return arr


def as_is_jpeg(data: bytes | bytearray | memoryview, size: int, max_pixels: int | None = None) -> np.ndarray | None:
    """A JPEG already at the load size, decoded by torchvision's libjpeg-turbo operator.

    Takes only what needs no resampling and no EXIF rotation: a baseline, extended or
    progressive JPEG with 1 or 3 components, ending with its EOI marker, whose shorter side is
    ``size`` (and longer side at most 16x that), within ``max_pixels`` and PIL's pixel limit.
    Centre crop as :func:`_square`. Call only where :func:`as_is_jpeg_enabled` is true.

    Returns:
        uint8 [size, size, 3] (the pixels :func:`decode_image` gets from PIL), or None: the
        file is not such a JPEG or the operator failed on it -- decode it with PIL.
    """
    from PIL import Image

    from .gpudecode import RGB, _SOF_OK, image_ops, jpeg_header

    h = jpeg_header(data)
    if not _as_is_header(h, size, max_pixels) or bytes(data[-2:]) != b"\xff\xd9":
        return None
    w, hh = h["width"], h["height"]
    import torch

    try:
        img = image_ops().decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), RGB, False)
    except Exception:  # noqa: BLE001 - PIL decides what a bad file is
        return None
    if tuple(img.shape) != (3, hh, w):
        return None
    left, top = (w - size) // 2, (hh - size) // 2
    return np.ascontiguousarray(img[:, top:top + size, left:left + size].permute(1, 2, 0).numpy())


def _as_is_header(h: dict | None, size: int, max_pixels: int | None = None) -> bool:
    """Whether a JPEG header (:func:`~deephash_faiss.gpudecode.jpeg_header`) is one
    :func:`as_is_jpeg` takes: a supported frame, 1 or 3 components, no rotation, shorter side
    ``size``, longer side at most 16x that, within ``max_pixels`` and PIL's pixel limit."""
    from PIL import Image

    from .gpudecode import _SOF_OK

    if h is None or h["sof"] not in _SOF_OK or h["components"] not in (1, 3) or h["orientation"] not in (None, 1):
        return False
    w, hh = h["width"], h["height"]
    limit = Image.MAX_IMAGE_PIXELS
    return not (min(w, hh) != size or max(w, hh) > 16 * size or (max_pixels is not None and w * hh > max_pixels)
                or (limit and w * hh > limit))


AT_SIZE_SAMPLE = 32  # files looked at by at_load_size
AT_SIZE_SHARE = 0.9  # the share of them that must be at the load size
AT_SIZE_HEAD_BYTES = 1 << 16  # bytes read of each (the header; EXIF can take most of 64 KiB)


def at_load_size(paths: Sequence[str], size: int) -> bool:
    """Whether the images are mostly JPEGs already at the load size, i.e. ones
    :func:`as_is_jpeg` decodes without resampling (CIFAR-10 at 32 px): judged from the headers
    of :data:`AT_SIZE_SAMPLE` files spread over ``paths`` (at least :data:`AT_SIZE_SHARE` of
    them), false where the as-is path is off here (:func:`as_is_jpeg_enabled`). Unreadable
    files count as not at the size."""
    from .gpudecode import jpeg_header

    if not len(paths) or not as_is_jpeg_enabled():
        return False
    picks = sorted({int(i) for i in np.linspace(0, len(paths) - 1, min(AT_SIZE_SAMPLE, len(paths)))})
    ok = 0
    for i in picks:
        try:
            with open(paths[i], "rb") as f:
                head = f.read(AT_SIZE_HEAD_BYTES)
        except OSError:
            continue
        ok += _as_is_header(jpeg_header(head), size)
    return ok >= AT_SIZE_SHARE * len(picks)


_AS_IS: list[bool] = []  # the self-check's verdict, once per process


def _as_is_max_bytes(size: int) -> int:
    """Files above this many bytes are left to PIL unread: a JPEG with shorter side ``size``
    and longer side <= 16x that is smaller (3 bytes a pixel, plus 256 KiB of markers and EXIF),
    and a photo is not read into memory twice."""
    return 48 * size * size + (256 << 10)


def as_is_jpeg_enabled() -> bool:
    """Whether :func:`as_is_jpeg` is used here: torch is already imported (a spawned decode
    worker does not pay its import for this), ``DHF_AS_IS_JPEG`` is not ``0``, and a self-check
    (small colour, 4:4:4, grayscale and progressive JPEGs, made by PIL) decodes them to PIL's
    pixels exactly -- so a torchvision built with another libjpeg than Pillow's is never used."""
    if _AS_IS:
        return _AS_IS[0]
    if "torch" not in sys.modules:
        return False  # not decided: a later call, after torch is imported, may enable it
    ok = os.environ.get("DHF_AS_IS_JPEG", "1") != "0"
    if ok:
        try:
            ok = _as_is_self_check()
        except Exception:  # noqa: BLE001 - no operator, no torchvision: PIL only
            ok = False
    _AS_IS.append(ok)
    return ok


def _as_is_self_check() -> bool:
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (40, 33, 3), dtype=np.uint8)
    base[::3] //= 2  # some structure, some noise
    cases = [("RGB", {"quality": 90}), ("RGB", {"quality": 75, "subsampling": 0}),
             ("L", {"quality": 85}), ("RGB", {"quality": 80, "progressive": True})]
    for mode, opts in cases:
        buf = io.BytesIO()
        Image.fromarray(base).convert(mode).save(buf, "JPEG", **opts)
        data = buf.getvalue()
        with Image.open(io.BytesIO(data)) as im:
            ref = _rgb_square(im.convert("RGB") if mode == "RGB" else im, 33)
        got = as_is_jpeg(data, 33)
        if got is None or not np.array_equal(got, ref):
            return False
    return True


def reduce_while_decoding(img, size: int) -> None:
    """Ask the decoder of an opened, not yet loaded image for a smaller raster where the
    format allows it: JPEG (and MPO) DCT scaling to the smallest of 1/1, 1/2, 1/4, 1/8 that
    keeps both sides >= ``size``. Other formats decode at full size."""
    from PIL import JpegImagePlugin

    if isinstance(img, JpegImagePlugin.JpegImageFile):
        img.draft(img.mode, (size, size))


def exif_oriented(img):
    """``img`` turned upright by its EXIF Orientation tag (a new image), or ``img`` itself
    when it has none (or an unreadable one). Call after ``load()``."""
    from PIL import ImageOps

    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a reason to refuse the pixels
        return img
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return img
    return ImageOps.exif_transpose(img)


def release_memory() -> None:
    """Hand the C heap's free memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Large decodes free hundreds of MiB that glibc otherwise keeps in its arenas, so a
    server's resident size would stay at its peak."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (tabs, newlines and runs of spaces collapsed), at most ``limit`` chars."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


_BOMB_WARNINGS_QUIET = False


def _quiet_bomb_warnings() -> None:
    """PIL's DecompressionBombWarning is replaced by our own check: silence it once (process-wide)."""
    global _BOMB_WARNINGS_QUIET
    if not _BOMB_WARNINGS_QUIET:
        from PIL import Image

        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _BOMB_WARNINGS_QUIET = True


def _rgb_square(img, size: int) -> np.ndarray:
    """Any decoded PIL image -> uint8 [size, size, 3] (8-bit RGB, :func:`_square`).

    Grayscale (``L``) is resized and cropped first and then replicated to three channels:
    the same pixels as converting to RGB first (resampling is per channel), at a third of
    the memory."""
    if img.mode == "L":
        grey = _square(img, size, channels=1)
        return np.repeat(grey[:, :, None], 3, axis=2)
    rgb = _to_rgb(img)
    try:
        return _square(rgb, size)
    finally:
        if rgb is not img:
            rgb.close()


def _square(img, size: int, channels: int = 3) -> np.ndarray:
    """Shorter side resized to ``size``, centre crop -> uint8 [size, size, channels]
    (an RGB image: 3; an ``L`` image: 1, returned as [size, size])."""
    from PIL import Image

    w, h = img.size
    if w < 1 or h < 1:
        raise ImageDecodeError("image has no pixels")
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if max(nw, nh) > 16 * size:
        # extreme aspect ratio (e.g. 100000 x 1): resizing the whole strip would need
        # nw * size pixels; resize only the centre square (same result up to edge taps)
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
        return np.asarray(img, dtype=np.uint8)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    if arr.shape != ((size, size, 3) if channels == 3 else (size, size)):
        raise ImageDecodeError(f"unexpected decoded shape {arr.shape}")
    return arr


def _to_rgb(img):
    """Convert any PIL mode (CMYK, palette, alpha, 16-bit, float) to 8-bit RGB."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")  # no copy of an RGBA raster
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(background, rgba)
        background.close()
        if rgba is not img:
            rgba.close()
        try:
            return out.convert("RGB")
        finally:
            out.close()
    return img.convert("RGB")


def probe_load_size(paths: Sequence[str], max_size: int, sample: int = 16) -> int:
    """Pick the square size to decode to: the largest shorter side among the first
    ``sample`` readable images, capped at ``max_size`` (the model's input size)."""
    from PIL import Image

    _quiet_bomb_warnings()
    best = 0
    for path in paths[:sample]:
        try:
            with Image.open(path, formats=PIL_FORMATS) as img:
                best = max(best, min(img.size))
        except Exception:  # noqa: BLE001 - unreadable files are dealt with at decode time
            continue
    return int(min(max_size, best)) if best else int(max_size)


def default_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 1)))


def iter_decoded(
    paths: Sequence[str], size: int, batch_size: int, workers: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
    """Decode images in batches with a thread pool, in order.

    Yields:
        (images uint8 [b, size, size, 3], positions int64 [b] into ``paths`` of the
        images that decoded, bad [(position, reason)] of those that did not).
    """
    workers = workers or default_workers()

    def one(i: int):
        try:
            return i, decode_image(paths[i], size), None
        except ImageDecodeError as err:
            return i, None, str(err)

    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(paths), batch_size):
            stop = min(len(paths), start + batch_size)
            results = list(pool.map(one, range(start, stop)))
            good = [(i, a) for i, a, _ in results if a is not None]
            bad = [(i, r) for i, a, r in results if a is None]
            imgs = (
                np.stack([a for _, a in good])
                if good
                else np.zeros((0, size, size, 3), np.uint8)
            )
            yield imgs, np.asarray([i for i, _ in good], dtype=np.int64), bad


def load_images(
    paths: Sequence[str], size: int, workers: int | None = None, progress: bool = False, desc: str = "decode"
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Decode all ``paths`` into memory.

    Returns:
        (images uint8 [n_ok, size, size, 3], positions int64 [n_ok], bad [(position, reason)]).
    """
    from tqdm.auto import tqdm

    chunks, pos, bad = [], [], []
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
        for imgs, p, b in iter_decoded(paths, size, 512, workers):
            chunks.append(imgs)
            pos.append(p)
            bad.extend(b)
            bar.update(len(p) + len(b))
    if not chunks:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64), bad
    return np.concatenate(chunks), np.concatenate(pos), bad
