"""Image decoding conventions and memory (deephash_faiss.data.decode_image, scan_images).

Memory is measured in a fresh subprocess (``corpus.measure_decode``: its peak RSS and its RSS
afterwards), so the test process's own history cannot hide or fake an allocation; the
thresholds sit far from both the old and the new behaviour (numbers in docs/reliability.md,
from benchmarks/bench_decode_memory.py).
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
from corpus import crafted_png, measure_decode

from deephash_faiss.data import (ImageDecodeError, ImageTooLargeError, decode_image, scan_images,
                                 unsupported_image_reason)

try:
    GLIBC_LINUX = sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))
except (AttributeError, ValueError, OSError):
    GLIBC_LINUX = False


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc for RSS")


# ---------------------------------------------------------------- pixel limits and memory

def test_pixel_limit_is_checked_from_the_header(tmp_path):
    p = str(tmp_path / "wide.png")
    with open(p, "wb") as f:
        f.write(crafted_png(4000, 3000))
    with pytest.raises(ImageTooLargeError, match="12000000 pixels exceeds the limit of 10000000"):
        decode_image(p, 32, max_pixels=10_000_000)
    assert decode_image(p, 32, max_pixels=12_000_000).shape == (32, 32, 3)
    assert issubclass(ImageTooLargeError, ImageDecodeError)


@needs_proc
def test_huge_dimension_png_is_refused_without_decoding(tmp_path):
    """A 6000 x 6000 PNG of ~40 KB over the limit: refused from its header, so the process
    never grows by the 36-108 MB its raster would take."""
    p = str(tmp_path / "bomb.png")
    with open(p, "wb") as f:
        f.write(crafted_png(6000, 6000))
    assert os.path.getsize(p) < 100_000
    m = measure_decode(p, threads=4, max_pixels=25_000_000)
    assert len(m["errors"]) == 8 and all("ImageTooLargeError" in e for e in m["errors"])  # 4 threads x 2
    assert m["peak_mib"] < 20, m


@needs_proc
def test_grayscale_is_resized_before_it_becomes_rgb(tmp_path):
    """A 6000 x 6000 grayscale PNG (36 MB raster): the decode used to convert it to RGB
    (+108 MB) before resizing; now its peak stays near the raster itself (measured: +37 MiB,
    was +173 MiB)."""
    p = str(tmp_path / "grey.png")
    with open(p, "wb") as f:
        f.write(crafted_png(6000, 6000, 0))
    m = measure_decode(p)
    assert m["errors"] == []
    assert m["peak_mib"] < 100, m


@needs_proc
@pytest.mark.skipif(not GLIBC_LINUX, reason="malloc_trim is glibc's")
def test_memory_goes_back_after_a_large_decode(tmp_path):
    """Two 6000 x 6000 RGB PNG decodes in a row: afterwards the process is back near where
    it started (measured +10 MiB; glibc used to keep +147 MiB in its arenas)."""
    p = str(tmp_path / "rgb.png")
    with open(p, "wb") as f:
        f.write(crafted_png(6000, 6000, 2))
    m = measure_decode(p)
    assert m["errors"] == []
    assert m["after_mib"] < 40, m


def test_jpeg_is_reduced_while_decoding_in_every_mode(tmp_path, monkeypatch):
    """JPEG DCT scaling (Image.draft) for RGB, grayscale and CMYK JPEGs: the raster handed on
    is the smallest 1/2^n reduction that keeps both sides >= the load size."""
    from PIL import Image

    from deephash_faiss import data

    seen = []
    real = data._rgb_square
    monkeypatch.setattr(data, "_rgb_square", lambda img, size: (seen.append((img.mode, img.size)), real(img, size))[1])
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8))
    for mode in ("RGB", "L", "CMYK"):
        p = str(tmp_path / f"{mode}.jpg")
        base.convert(mode).save(p, quality=80)
        seen.clear()
        assert decode_image(p, 100).shape == (100, 100, 3)
        assert seen == [(mode, (200, 150))], mode  # 1/8: 200 x 150 >= 100 x 100


# ---------------------------------------------------------------- EXIF orientation

def _oriented(tmp_path, orientation: int, fmt: str):
    """An asymmetric 40 x 24 image saved with an EXIF Orientation tag; the same pixels saved
    without the tag; the upright image (PIL's exif_transpose) saved without it."""
    from PIL import Image, ImageOps

    a = np.zeros((24, 40, 3), np.uint8)
    a[:, :10] = (250, 20, 20)      # a red band on the left
    a[:6, :] = (20, 20, 250)       # a blue band on top
    a[18:, 30:] = (20, 250, 20)    # a green corner bottom right
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = str(tmp_path / f"o{orientation}.{fmt}")
    img.save(p, exif=exif.tobytes())
    plain = str(tmp_path / f"plain.{fmt}")
    img.save(plain)
    upright = str(tmp_path / f"upright{orientation}.{fmt}")
    with Image.open(p) as im:
        ImageOps.exif_transpose(im).save(upright)
    return p, plain, upright


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    from deephash_faiss.serve import decode_image_bytes

    p, plain, upright = _oriented(tmp_path, orientation, "png")
    want = decode_image(upright, 16)
    got = decode_image(p, 16)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, decode_image(plain, 16))  # the tag did change the picture
    with open(p, "rb") as f:  # uploads are decoded the same way
        np.testing.assert_array_equal(decode_image_bytes(f.read(), 16), want)


def test_exif_orientation_in_a_jpeg_turns_it(tmp_path):
    """Orientation 6 (rotate 90 degrees clockwise to display): the red band on the left of
    the stored pixels is on top of the decoded image."""
    from PIL import Image

    a = np.full((32, 32, 3), 235, np.uint8)
    a[:, :10] = (250, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = str(tmp_path / "turned.jpg")
    Image.fromarray(a).save(p, exif=exif.tobytes(), quality=95)
    arr = decode_image(p, 32).astype(int)
    top, bottom, left = arr[:6, 8:24].mean(axis=(0, 1)), arr[-6:, 8:24].mean(axis=(0, 1)), arr[12:20, :6].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 80, top        # red on top
    assert min(bottom) > 200 and min(left) > 200, (bottom, left)  # light elsewhere


def test_broken_exif_does_not_refuse_the_image(tmp_path):
    from PIL import Image

    p = str(tmp_path / "badexif.jpg")
    Image.new("RGB", (20, 20), (10, 120, 200)).save(p, exif=b"Exif\x00\x00garbage-not-tiff")
    assert decode_image(p, 8).shape == (8, 8, 3)


# ---------------------------------------------------------------- files that are not decoded

def test_svg_and_other_unsupported_images_are_reported(tmp_path):
    root = tmp_path / "imgs"
    (root / "cats").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(root / "cats" / "a.png")
    (root / "cats" / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / "cats" / "photo.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    (root / "top.svg").write_text("<svg/>")
    (root / "cats" / "notes.txt").write_text("not image-like: ignored silently")
    images = scan_images(str(root))
    assert [os.path.basename(p) for p in images.paths] == ["a.png"]
    reasons = {os.path.basename(p): r for p, r in images.skipped}
    assert set(reasons) == {"logo.svg", "photo.HEIC", "top.svg"}
    assert reasons["logo.svg"].startswith("unsupported image format (.svg)")
    assert reasons["photo.HEIC"].startswith("unsupported image format (.heic)")
    assert unsupported_image_reason("x.png") is None and unsupported_image_reason("x.txt") is None


def test_svg_is_listed_in_the_index_skip_report(tmp_path):
    """Through build_index: the SVG gets a line in skipped.tsv with its reason."""
    torch = pytest.importorskip("torch")  # noqa: F841
    from PIL import Image

    from deephash_faiss import api
    from deephash_faiss.model import build_model, save_checkpoint

    root = tmp_path / "imgs" / "a"
    root.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 60, 10, 10)).save(root / f"{i}.png")
    (root / "vector.svg").write_text("<svg/>")
    model = str(tmp_path / "m.pt")
    save_checkpoint(build_model("smallcnn", 8, ["a"], weights="none", input_size=16, seed=0), model)
    out = str(tmp_path / "idx")
    api.build_index(str(tmp_path / "imgs"), out, model, device="cpu", progress=False)
    from deephash_faiss.store import read_manifest

    m = read_manifest(out)
    assert m["count"] == 3
    report = api.read_skip_report(out, m)
    assert [(os.path.basename(p), r.split(":")[0]) for p, r in report] == [
        ("vector.svg", "unsupported image format (.svg)")]


def test_decode_of_bytes_and_files_agree_for_png_with_alpha(tmp_path):
    """The RGBA path no longer copies the raster; the pixels are those of compositing over white."""
    from PIL import Image

    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (30, 50, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, "RGBA").save(buf, "PNG")
    got = decode_image(buf.getvalue(), 30)
    over_white = Image.alpha_composite(Image.new("RGBA", (50, 30), (255, 255, 255, 255)),
                                       Image.fromarray(a, "RGBA")).convert("RGB")
    left = (50 - 30) // 2
    np.testing.assert_array_equal(got, np.asarray(over_white)[:, left:left + 30])
