"""JPEGs already at the load size go through torchvision's libjpeg-turbo operator
(data.as_is_jpeg): the pixels must be PIL's exactly, and anything else must go to PIL."""

import io

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from deephash_faiss import data  # noqa: E402


def _jpeg(w, h, mode="RGB", seed=0, **opts):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr[::2] //= 3
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", **opts)
    return buf.getvalue()


def _pil_reference(blob, size):
    """Decode + centre crop with PIL alone (no resize: the shorter side is ``size``)."""
    with Image.open(io.BytesIO(blob)) as im:
        rgb = np.asarray(im.convert("RGB"))
    h, w = rgb.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return rgb[top:top + size, left:left + size]


def _pil_only(monkeypatch):
    monkeypatch.setattr(data, "_AS_IS", [False])


CASES = [
    (32, 32, "RGB", {"quality": 90}),
    (32, 32, "RGB", {"quality": 60, "subsampling": 0}),
    (32, 32, "RGB", {"quality": 95, "subsampling": 1}),
    (32, 32, "L", {"quality": 80}),
    (32, 32, "RGB", {"quality": 85, "progressive": True}),
    (32, 32, "RGB", {"quality": 75, "optimize": True}),
    (48, 32, "RGB", {"quality": 90}),
    (32, 45, "RGB", {"quality": 90}),
    (35, 33, "RGB", {"quality": 90}),
]


@pytest.mark.parametrize("w,h,mode,opts", CASES)
def test_as_is_equals_pil(w, h, mode, opts, tmp_path, monkeypatch):
    assert data.as_is_jpeg_enabled()  # torch is imported here: the self-check must pass
    size = min(w, h)
    blob = _jpeg(w, h, mode, seed=w * h, **opts)
    got = data.as_is_jpeg(blob, size)
    assert got is not None and got.dtype == np.uint8 and got.shape == (size, size, 3)
    np.testing.assert_array_equal(got, _pil_reference(blob, size))
    path = tmp_path / "a.jpg"
    path.write_bytes(blob)
    fast = data.decode_image(str(path), size)
    _pil_only(monkeypatch)
    np.testing.assert_array_equal(fast, data.decode_image(str(path), size))


def _exif_rotated():
    im = Image.fromarray(np.full((32, 32, 3), 100, np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def _png():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("blob,size,why", [
    (_jpeg(64, 64), 32, "needs a resize"),
    (_jpeg(32, 32, "CMYK"), 32, "4 components"),
    (_exif_rotated(), 32, "EXIF rotation"),
    (_png(), 32, "not a JPEG"),
    (_jpeg(32, 32)[:-2], 32, "no EOI: truncated"),
    (_jpeg(32, 600), 32, "extreme aspect ratio"),
])
def test_declined_files_go_to_pil(blob, size, why, monkeypatch):
    assert data.as_is_jpeg(blob, size) is None, why
    try:
        fast = data.decode_image(blob, size)
    except data.ImageDecodeError as err:
        fast = str(err)
    _pil_only(monkeypatch)
    try:
        ref = data.decode_image(blob, size)
    except data.ImageDecodeError as err:
        ref = str(err)
    if isinstance(ref, str):
        assert fast == ref
    else:
        np.testing.assert_array_equal(fast, ref)


def test_pixel_limit_is_honoured():
    blob = _jpeg(32, 32)
    assert data.as_is_jpeg(blob, 32, max_pixels=1000) is None
    with pytest.raises(data.ImageTooLargeError):
        data.decode_image(blob, 32, max_pixels=1000)


def test_corrupt_scan_same_outcome_as_pil(monkeypatch):
    blob = bytearray(_jpeg(32, 32, quality=90))
    blob[len(blob) // 2: len(blob) // 2 + 24] = b"\xff\x00" * 12  # garbage in the entropy-coded data
    blob = bytes(blob)

    def outcome():
        try:
            return data.decode_image(blob, 32)
        except data.ImageDecodeError as err:
            return str(err)

    fast = outcome()
    _pil_only(monkeypatch)
    ref = outcome()
    if isinstance(ref, str) or isinstance(fast, str):
        assert isinstance(fast, str) and isinstance(ref, str)
    else:
        np.testing.assert_array_equal(fast, ref)


def test_switch_off(monkeypatch):
    monkeypatch.setattr(data, "_AS_IS", [])
    monkeypatch.setenv("DHF_AS_IS_JPEG", "0")
    assert not data.as_is_jpeg_enabled()


def test_images_at_the_load_size_decode_in_one_thread(tmp_path, monkeypatch):
    """stream.decode_pool_plan: JPEGs already at the load size (data.at_load_size, a header
    sample) get AT_SIZE_THREADS thread(s); larger JPEGs, PNGs, a given worker count or kind,
    nvjpeg and a switched-off as-is path keep the usual pool."""
    from deephash_faiss import stream

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    if not data.as_is_jpeg_enabled():
        pytest.skip("the as-is path is off on this machine (its self-check failed)")
    small, big, png = [], [], []
    for i in range(40):
        p = tmp_path / f"s{i}.jpg"
        p.write_bytes(_jpeg(32, 32 + i % 3, seed=i))
        small.append(str(p))
        q = tmp_path / f"b{i}.jpg"
        q.write_bytes(_jpeg(96, 64, seed=i))
        big.append(str(q))
        r = tmp_path / f"p{i}.png"
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(r)
        png.append(str(r))
    n = 50_000
    assert data.at_load_size(small, 32) and not data.at_load_size(big, 32) and not data.at_load_size(png, 32)
    assert data.at_load_size(big, 64) and not data.at_load_size([], 32)
    assert stream.decode_pool_plan("pil", "auto", None, n, small, 32) == ("thread", stream.AT_SIZE_THREADS)
    assert stream.decode_pool_plan("pil", "auto", None, n, big, 32) == ("process", 16)
    assert stream.decode_pool_plan("pil", "auto", None, n, png, 32) == ("process", 16)
    assert stream.decode_pool_plan("pil", "auto", 4, n, small, 32) == ("process", 4)  # --workers given
    assert stream.decode_pool_plan("pil", "process", None, n, small, 32) == ("process", 16)
    assert stream.decode_pool_plan("nvjpeg", "auto", None, n, small, 32) == ("thread", stream.NVJPEG_READERS)
    # a mix: under AT_SIZE_SHARE at the size
    assert not data.at_load_size(small[:20] + big[:20], 32)
    monkeypatch.setattr(data, "_AS_IS", [False])
    assert stream.decode_pool_plan("pil", "auto", None, n, small, 32) == ("process", 16)
