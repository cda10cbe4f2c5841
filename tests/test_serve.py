"""The HTTP service (deephash_faiss.serve) over a tiny generated index, through FastAPI's TestClient."""

from __future__ import annotations

import io
import json
import os
import time
import warnings

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's TestClient warns about httpx versions
    from fastapi.testclient import TestClient

from serve_helpers import build_tiny_index, write_query  # noqa: E402

MODES = ("bcs", "hds", "es")
UPLOAD_LIMIT = 200_000
BASE_URL = "http://localhost"  # an allowed Host (TestClient's default "testserver" is not)


def _client(app):
    return TestClient(app, base_url=BASE_URL)


@pytest.fixture(scope="session")
def serve_index(tmp_path_factory):
    """A 60-image, 3-class, 16-bit smallcnn index (shared with test_browser.py)."""
    return build_tiny_index(str(tmp_path_factory.getbasetemp() / "dhf-serve"))


@pytest.fixture(scope="module")
def searcher(serve_index):
    from deephash_faiss import api

    return api.open_index(serve_index, device="cpu", features_in_memory=True)


@pytest.fixture(scope="module")
def app(serve_index):
    from deephash_faiss.serve import create_app

    return create_app(serve_index, device="cpu", max_upload_bytes=UPLOAD_LIMIT, request_timeout_s=30)


@pytest.fixture(scope="module")
def client(app):
    with _client(app) as c:
        yield c


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
    d = tmp_path_factory.mktemp("queries")
    return {
        "png": write_query(str(d / "circle.png"), 0),
        "jpg": write_query(str(d / "stripes.jpg"), 1, seed=7),
        "gif": write_query(str(d / "checks.gif"), 2, seed=9),
    }


def _upload(client, path, **params):
    with open(path, "rb") as f:
        return client.post("/search", files={"image": (os.path.basename(path), f.read(), "image/png")},
                           data={k: str(v) for k, v in params.items()})


def _assert_same(rows, batch):
    r = batch.results[0]
    assert [row["id"] for row in rows] == r.ids.tolist()
    assert [row["hamming"] for row in rows] == r.hamming.tolist()
    for row, d in zip(rows, r.distance):
        if np.isnan(d):
            assert row["distance"] is None
        else:
            assert row["distance"] == pytest.approx(float(d), rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------- search

@pytest.mark.parametrize("mode", MODES)
def test_search_by_upload_matches_searcher(client, searcher, queries, mode):
    for kind in ("png", "jpg"):
        resp = _upload(client, queries[kind], mode=mode, k=7, radius=4, max_candidates=50)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        codes, feats, _ = searcher.encode([queries[kind]])
        batch = searcher.search(mode, codes, feats, 7, 4, 50)
        assert len(body["results"]) == 7
        _assert_same(body["results"], batch)
        assert body["candidates"] == batch.results[0].candidates
        assert body["truncated"] == batch.results[0].truncated
        assert body["query"] == os.path.basename(queries[kind]) and body["query_id"] is None


@pytest.mark.parametrize("mode", MODES)
def test_search_by_id_matches_searcher(client, searcher, mode):
    qid = 25
    resp = client.post("/search", json={"id": qid, "mode": mode, "k": 12, "radius": 2, "max_candidates": 30})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    ids = np.array([qid])
    batch = searcher.search(mode, searcher.codes()[ids], searcher.store.gather(ids).astype(np.float32), 12, 2, 30)
    _assert_same(body["results"], batch)
    assert body["query_id"] == qid
    assert body["query"] == os.path.relpath(searcher.store.paths()[qid], searcher.manifest["source"])
    if mode != "bcs":
        assert body["results"][0]["id"] == qid and body["results"][0]["distance"] == pytest.approx(0, abs=1e-4)


def test_search_params_from_query_string(client, searcher):
    body = client.post("/search?mode=bcs&k=3", json={"id": 4}).json()
    assert body["mode"] == "bcs" and len(body["results"]) == 3


def test_json_shape_matches_cli(client, serve_index, queries):
    from click.testing import CliRunner

    from deephash_faiss.cli import main

    out = CliRunner().invoke(main, ["search", "--query", queries["png"], "--index", serve_index, "--mode", "hds",
                                    "-k", "5", "--json", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    (cli,) = json.loads(out.stdout)  # the CLI prints a list, one object per query
    body = _upload(client, queries["png"], mode="hds", k=5).json()
    assert set(cli) <= set(body)
    for key in ("mode", "query", "results", "timing_ms", "candidates", "truncated"):
        assert key in body
    assert body["mode"] == cli["mode"] and body["candidates"] == cli["candidates"]
    assert body["truncated"] == cli["truncated"]
    assert isinstance(body["timing_ms"], float) and body["timing_ms"] >= 0
    for api_row, cli_row in zip(body["results"], cli["results"], strict=True):
        assert set(api_row) == set(cli_row) | {"thumbnail_url", "image_url"}
        for key in ("rank", "id", "label", "hamming"):
            assert api_row[key] == cli_row[key]
        # the service names images relative to the indexed folder, never by server path
        assert api_row["path"] == os.path.relpath(cli_row["path"], os.path.join(serve_index, "..", "images"))
        assert not os.path.isabs(api_row["path"])
        assert api_row["distance"] == pytest.approx(cli_row["distance"], rel=1e-4, abs=1e-5)
        assert api_row["thumbnail_url"] == f"/images/{api_row['id']}?thumb=1"
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]


def test_upload_of_other_formats(client, queries):
    resp = _upload(client, queries["gif"], mode="es", k=3)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["results"]) == 3


# ---------------------------------------------------------------- images

def test_thumbnail_and_full_image(client, searcher):
    from PIL import Image

    resp = client.get("/images/0?thumb=1")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(resp.content))
    assert max(thumb.size) <= 128 and thumb.mode == "RGB"
    resp = client.get("/images/59")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    with open(searcher.store.paths()[59], "rb") as f:
        assert resp.content == f.read()


@pytest.mark.parametrize("url", [
    "/images/../../etc/passwd", "/images/%2e%2e", "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/images/..%2f..%2fetc%2fpasswd", "/images/0%2f..%2f..%2fetc%2fpasswd", "/images//etc/passwd",
    "/images/-1", "/images/60", "/images/99999999", "/images/99999999999999999999999999",
    "/images/1e3", "/images/0x1", "/images/%00", "/static/../manifest.json",
    "/static/%2e%2e/serve.py", "/images/-1?thumb=1", "/images/60?thumb=1",
])
def test_image_traversal_and_bad_ids(client, url):
    resp = client.get(url)
    assert resp.status_code in (404, 422), (url, resp.status_code)
    assert b"root:" not in resp.content and b"import" not in resp.content


def test_deleted_ids_are_not_served(serve_index):
    from deephash_faiss import api
    from deephash_faiss.serve import create_app

    s = api.open_index(serve_index, device="cpu", features_in_memory=True)
    mask = np.zeros(s.count, bool)
    mask[3] = True
    s.index.deleted = mask
    with _client(create_app(serve_index, searcher=s)) as c:
        assert c.get("/images/3").status_code == 404
        assert c.get("/images/4").status_code == 200
        assert c.post("/search", json={"id": 3}).status_code == 422
        assert c.get("/info").json()["live_count"] == 59
        body = c.post("/search", json={"id": 4, "mode": "es", "k": 59}).json()
        assert 3 not in [r["id"] for r in body["results"]]


# ---------------------------------------------------------------- limits

def test_upload_too_large_is_413(client):
    big = np.random.default_rng(0).integers(0, 256, UPLOAD_LIMIT + 1000, dtype=np.uint8).tobytes()
    resp = client.post("/search", files={"image": ("big.png", big, "image/png")})
    assert resp.status_code == 413
    assert "too large" in resp.json()["detail"]


def test_upload_too_large_without_content_length_is_413(client):
    boundary = "dhfboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()

    def chunks():
        yield head
        for _ in range(10):
            yield b"\0" * 50_000
        yield f"\r\n--{boundary}--\r\n".encode()

    resp = client.post("/search", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert resp.status_code == 413


def test_json_body_too_large_is_413(client):
    resp = client.post("/search", content=b"{\"id\": 1, \"pad\": \"" + b"x" * 100_000 + b"\"}",
                       headers={"content-type": "application/json"})
    assert resp.status_code == 413


def test_non_image_upload_is_415(client):
    resp = client.post("/search", files={"image": ("notes.txt", b"these are not pixels", "text/plain")})
    assert resp.status_code == 415
    assert "not a usable image" in resp.json()["detail"]
    resp = client.post("/search", files={"image": ("empty.png", b"", "image/png")})
    assert resp.status_code == 415
    # a PNG header and then garbage: truncated
    resp = client.post("/search", files={"image": ("cut.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png")})
    assert resp.status_code == 415


def test_bad_requests(client):
    assert client.post("/search", content=b"hello", headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/search", data={"mode": "hds"}).status_code == 422  # no image field
    assert client.post("/search", data={"image": "a string"}).status_code == 422
    assert client.post("/search", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/search", json=[1, 2]).status_code == 422
    assert client.post("/search", json={"mode": "hds"}).status_code == 422  # no id
    for bad_id in (-1, 60, 10**30, "x", 1.5, True):
        resp = client.post("/search", json={"id": bad_id})
        assert resp.status_code == 422, bad_id
        assert isinstance(resp.json()["detail"], str)


@pytest.mark.parametrize("params, ok", [
    ({"k": 0}, False), ({"k": -3}, False), ({"k": 60}, True), ({"k": 61}, False), ({"k": 1000}, False),
    ({"k": "ten"}, False), ({"k": 2.5}, False), ({"radius": -1}, False), ({"radius": 0}, True),
    ({"radius": 16}, True), ({"radius": 17}, True), ({"radius": 18}, False), ({"max_candidates": 0}, False),
    ({"max_candidates": 1}, True), ({"mode": "fast"}, False), ({"mode": "ES"}, True),
])
def test_parameter_bounds(client, params, ok):
    resp = client.post("/search", json={"id": 10, "mode": "hds", **params})
    assert resp.status_code == (200 if ok else 422), (params, resp.text)
    if not ok:
        assert isinstance(resp.json()["detail"], str) and len(resp.json()["detail"]) < 200
    # the same bounds apply to form fields of an upload
    if not ok and "k" in params:
        form = client.post("/search", files={"image": ("q.png", _png_bytes(), "image/png")},
                           data={k: str(v) for k, v in params.items()})
        assert form.status_code == 422


def _png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 30), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def test_timeout_is_504(serve_index, searcher):
    from deephash_faiss.serve import create_app

    app = create_app(serve_index, searcher=searcher, request_timeout_s=0.2)
    engine = app.state.engine
    real = engine.view.search

    def slow(*a, **kw):
        time.sleep(2.0)
        return real(*a, **kw)

    engine.view.search = slow
    with _client(app) as c:
        t0 = time.perf_counter()
        resp = c.post("/search", json={"id": 1})
        assert resp.status_code == 504 and "longer than 0.2 s" in resp.json()["detail"]
        assert time.perf_counter() - t0 < 1.5  # answered before the 2 s search ends
        engine.view.search = real
        time.sleep(2.0)  # let the abandoned search finish on the worker
        assert c.post("/search", json={"id": 1}).status_code == 200


def test_busy_is_503(serve_index, searcher):
    import threading

    from deephash_faiss.serve import create_app

    app = create_app(serve_index, searcher=searcher, max_pending=1, request_timeout_s=5)
    engine = app.state.engine
    gate = threading.Event()
    real = engine.view.search

    def held(*a, **kw):
        gate.wait(5)
        return real(*a, **kw)

    engine.view.search = held
    with _client(app) as c:
        results = {}
        t = threading.Thread(target=lambda: results.setdefault("first", c.post("/search", json={"id": 1})))
        t.start()
        deadline = time.monotonic() + 5
        while engine._pending < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = c.post("/search", json={"id": 2})
        gate.set()
        t.join(10)
        assert second.status_code == 503
        assert results["first"].status_code == 200


def test_create_app_rejects_bad_settings(serve_index, searcher, tmp_path):
    from deephash_faiss.errors import DhfError
    from deephash_faiss.serve import create_app

    with pytest.raises(DhfError):
        create_app(serve_index, searcher=searcher, max_upload_bytes=0)
    with pytest.raises(DhfError, match="no such index"):
        create_app(str(tmp_path / "nothing"))


# ---------------------------------------------------------------- metadata and page

def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok", "count": 60, "live_count": 60}


def test_info(client):
    info = client.get("/info").json()
    assert info["count"] == 60 and info["bits"] == 16
    assert info["model"]["backbone"] == "smallcnn" and info["feature_dim"] == 512
    assert sorted(info["classes"]) == ["checks", "circles", "stripes"]
    assert info["index"]["type"] == "flat"
    assert info["limits"] == {"k_max": 60, "radius_max": 17, "max_candidates_min": 1}


def test_docs_and_openapi(client):
    resp = client.get("/docs")
    assert resp.status_code == 200 and "swagger" in resp.text.lower()
    spec = client.get("/openapi.json").json()
    assert {"/search", "/images/{image_id}", "/healthz", "/info"} <= set(spec["paths"])
    content = spec["paths"]["/search"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for needle in ('id="drop"', 'name="mode"', 'id="k"', 'id="radius"', 'id="grid"', "/static/app.js"):
        assert needle in page.text
    assert client.get("/static/app.js").status_code == 200
    assert "text/css" in client.get("/static/style.css").headers["content-type"]


def test_cli_serve_help_and_bad_index(tmp_path):
    from click.testing import CliRunner

    from deephash_faiss.cli import main

    out = CliRunner().invoke(main, ["serve", "--help"])
    assert out.exit_code == 0 and "--max-upload-mb" in out.output
    out = CliRunner().invoke(main, ["serve", "--index", str(tmp_path / "missing"), "--device", "cpu"])
    assert out.exit_code == 1 and "Error: no such index directory" in out.output


# ---------------------------------------------------------------- decoding uploads

def test_decode_image_bytes_equals_decode_image(tmp_path):
    from PIL import Image

    from deephash_faiss.data import decode_image
    from deephash_faiss.serve import decode_image_bytes

    rng = np.random.default_rng(3)
    cases = {
        "wide.png": Image.fromarray(rng.integers(0, 256, (30, 70, 3), dtype=np.uint8)),
        "tall.jpg": Image.fromarray(rng.integers(0, 256, (90, 41, 3), dtype=np.uint8)),
        "big.jpg": Image.fromarray(rng.integers(0, 256, (200, 260, 3), dtype=np.uint8)),
        "alpha.png": Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "RGBA"),
        "grey.png": Image.fromarray(rng.integers(0, 256, (33, 33), dtype=np.uint8), "L"),
        "palette.gif": Image.fromarray(rng.integers(0, 256, (50, 20, 3), dtype=np.uint8)).convert("P"),
        "tiny.bmp": Image.fromarray(rng.integers(0, 256, (5, 9, 3), dtype=np.uint8)),
    }
    for name, img in cases.items():
        p = str(tmp_path / name)
        img.save(p)
        with open(p, "rb") as f:
            got = decode_image_bytes(f.read(), 32)
        want = decode_image(p, 32)
        assert got.shape == (32, 32, 3) and got.dtype == np.uint8 and got.flags.writeable
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_decompression_bomb_upload_is_413(client, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    resp = client.post("/search", files={"image": ("huge.png", _png_bytes(), "image/png")})
    assert resp.status_code == 413
    assert "decompression bomb" in resp.json()["detail"]


# ---------------------------------------------------------------- file names, server paths, hosts

@pytest.fixture(scope="module")
def odd_index(serve_index, tmp_path_factory):
    """A 6-image index (the serve index's model) whose names are not UTF-8: a class folder
    b"circ\\xff" and a file b"\\xfe\\xff.png" (surrogate escapes in Python)."""
    from deephash_faiss import api
    from serve_helpers import write_images

    base = tmp_path_factory.mktemp("odd")
    images = str(base / "images")
    write_images(images, per_class=2)
    os.rename(os.path.join(images, "circles"), os.fsdecode(os.fsencode(os.path.join(images, "circ")) + b"\xff"))
    os.rename(os.path.join(images, "stripes", "000.png"),
              os.fsdecode(os.fsencode(os.path.join(images, "stripes")) + b"/\xfe\xff.png"))
    out = str(base / "index")
    api.build_index(images, out, os.path.join(serve_index, "..", "model.pt"), device="cpu", progress=False)
    return out


def test_non_utf8_names_are_served(odd_index, queries):
    """Names with undecodable bytes come back as \\xNN text (was: 500 UnicodeEncodeError)."""
    from deephash_faiss.serve import create_app

    with _client(create_app(odd_index, device="cpu")) as c:
        info = c.get("/info")
        assert info.status_code == 200
        assert "circ\\xff" in info.json()["classes"]
        paths = c.post("/search", json={"id": 0, "mode": "es", "k": 6}).json()
        names = {r["path"] for r in paths["results"]}
        assert "stripes/\\xfe\\xff.png" in names and "circ\\xff/000.png" in names
        assert {r["label"] for r in paths["results"]} == {"checks", "circ\\xff", "stripes"}
        odd_id = next(r["id"] for r in paths["results"] if r["path"] == "stripes/\\xfe\\xff.png")
        by_odd = c.post("/search", json={"id": odd_id, "k": 3})
        assert by_odd.status_code == 200 and by_odd.json()["query"] == "stripes/\\xfe\\xff.png"
        assert c.get(f"/images/{odd_id}?thumb=1").status_code == 200
        up = _upload(c, queries["png"], mode="bcs", k=6)
        assert up.status_code == 200 and len(up.json()["results"]) == 6


def test_public_text():
    from deephash_faiss.serve import public_text

    assert public_text("plain/é.png") == "plain/é.png"
    assert public_text(os.fsdecode(b"a\xff/b\xfe.png")) == "a\\xff/b\\xfe.png"
    assert public_text("lone \ud800") == "lone \\ud800"
    for s in (os.fsdecode(b"\xff"), "\ud800x"):
        public_text(s).encode("utf-8")


def _strings(x):
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _strings(v)


def test_no_server_paths_in_responses(client, serve_index, queries):
    server_dirs = {os.path.abspath(serve_index), os.path.dirname(os.path.abspath(serve_index)), os.getcwd()}
    bodies = [client.get("/info").json(), client.get("/healthz").json(),
              client.post("/search", json={"id": 3, "k": 20}).json(),
              _upload(client, queries["jpg"], mode="es", k=20).json()]
    assert "index_dir" not in bodies[0]
    for body in bodies:
        for s in _strings(body):
            assert not os.path.isabs(s) or s.startswith("/images/"), s
            assert not any(d in s for d in server_dirs), s
    rows = bodies[2]["results"]
    assert all(r["path"].split("/")[0] in ("circles", "stripes", "checks") for r in rows)
    assert bodies[2]["query"].startswith(("circles/", "stripes/", "checks/"))


@pytest.mark.parametrize("host, ok", [
    ("localhost", True), ("localhost:8000", True), ("LOCALHOST.", True), ("127.0.0.1:8000", True),
    ("[::1]:8000", True), ("[::1]", True), ("evil.example", False), ("evil.example:8000", False),
    ("localhost.evil.example", False), ("127.0.0.1.nip.io", False), ("", False),
])
def test_host_header_allow_list(app, host, ok):
    with _client(app) as c:
        resp = c.get("/healthz", headers={"host": host})
        assert resp.status_code == (200 if ok else 400), (host, resp.text)
        if not ok:
            assert "--allow-host" in resp.json()["detail"]
            assert c.post("/search", json={"id": 1}, headers={"host": host}).status_code == 400
            assert c.get("/images/1", headers={"host": host}).status_code == 400


def test_allow_host_option(serve_index, searcher):
    from deephash_faiss.serve import create_app

    app = create_app(serve_index, searcher=searcher, allowed_hosts=["localhost", "search.example.org", "*.lan"])
    with _client(app) as c:
        for host, code in (("search.example.org", 200), ("search.example.org:443", 200), ("pi.lan", 200),
                           ("127.0.0.1", 400), ("example.org", 400)):
            assert c.get("/healthz", headers={"host": host}).status_code == code, host
    with TestClient(create_app(serve_index, searcher=searcher, allowed_hosts=["*"])) as c:
        assert c.get("/healthz", headers={"host": "anything.example"}).status_code == 200


def test_serve_hosts_include_the_bound_address():
    from deephash_faiss.serve import host_name, serve_hosts

    assert set(serve_hosts("127.0.0.1", ())) == {"localhost", "127.0.0.1", "[::1]"}
    assert "192.168.1.5" in serve_hosts("192.168.1.5", ())
    assert "0.0.0.0" not in serve_hosts("0.0.0.0", ["box.lan"]) and "box.lan" in serve_hosts("0.0.0.0", ["box.lan"])
    assert host_name("::1") == "[::1]" and host_name("[fe80::1]:80") == "[fe80::1]"
    assert host_name("Example.ORG:8080") == "example.org"


# ---------------------------------------------------------------- request limits

@pytest.mark.parametrize("body", [
    b"[" * 30_000 + b"]" * 30_000,
    b'{"id": 1, "mode": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    b'{"id": 1, "x": ' + b'{"a":' * 9000 + b"1" + b"}" * 9000 + b"}",
], ids=["lists", "in-a-field", "objects"])
def test_deeply_nested_json_is_422(client, body):
    resp = client.post("/search", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 422, resp.text[:200]
    assert "nested too deeply" in resp.json()["detail"]


@pytest.mark.parametrize("field, value", [
    ("max_candidates", 10**30), ("max_candidates", 2**63), ("max_candidates", "99999999999999999999"),
    ("radius", 10**30), ("radius", 2**64), ("k", 10**30), ("k", -(10**30)),
])
def test_huge_parameters_are_422_not_503(client, field, value):
    for mode in MODES:
        resp = client.post("/search", json={"id": 5, "mode": mode, field: value})
        assert resp.status_code == 422, (mode, field, resp.status_code, resp.text[:200])
        detail = resp.json()["detail"]
        assert isinstance(detail, str) and field in detail and len(detail) < 200 and "busy" not in detail


# ---------------------------------------------------------------- decode memory and concurrency

def test_huge_dimension_upload_is_413_before_decoding(client, monkeypatch):
    """A 9400 x 9400 grayscale PNG of 86 KB (the tryout's case): refused from its header."""
    from corpus import crafted_png

    from deephash_faiss import data

    data_png = crafted_png(9400, 9400, 0)
    assert len(data_png) < 100_000
    loads = []
    monkeypatch.setattr(data, "_rgb_square", lambda *a: loads.append(a) or pytest.fail("decoded"))
    resp = client.post("/search", files={"image": ("huge.png", data_png, "image/png")})
    assert resp.status_code == 413, resp.text
    assert "88360000 pixels exceeds the limit of 25000000" in resp.json()["detail"]
    assert loads == []


def test_max_pixels_setting(serve_index, searcher):
    from deephash_faiss.serve import create_app

    with _client(create_app(serve_index, searcher=searcher, max_pixels=500)) as c:
        resp = c.post("/search", files={"image": ("q.png", _png_bytes(), "image/png")})  # 20 x 30 = 600 px
        assert resp.status_code == 413 and "limit of 500 pixels" in resp.json()["detail"]
    with _client(create_app(serve_index, searcher=searcher, max_pixels=600)) as c:
        assert c.post("/search", files={"image": ("q.png", _png_bytes(), "image/png")}).status_code == 200


def test_concurrent_decodes_never_exceed_the_limit(serve_index, searcher, monkeypatch):
    """8 uploads at once (plus thumbnails) with max_decodes=2: never more than 2 decodes run."""
    import threading

    from deephash_faiss import serve
    from deephash_faiss.serve import create_app

    lock, active, peak = threading.Lock(), [0], [0]

    def counted(fn):
        def wrapper(*a, **kw):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            try:
                time.sleep(0.15)
                return fn(*a, **kw)
            finally:
                with lock:
                    active[0] -= 1
        return wrapper

    monkeypatch.setattr(serve, "decode_image_bytes", counted(serve.decode_image_bytes))
    app = create_app(serve_index, searcher=searcher, max_decodes=2)
    view = app.state.engine.view
    view.thumbnail = counted(view.thumbnail)
    with _client(app) as c:
        codes = []

        def up():
            codes.append(c.post("/search", files={"image": ("q.png", _png_bytes(), "image/png")}).status_code)

        def thumb(i):
            codes.append(c.get(f"/images/{i}?thumb=1").status_code)

        threads = [threading.Thread(target=up) for _ in range(8)] + \
                  [threading.Thread(target=thumb, args=(i,)) for i in range(40, 44)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert codes == [200] * 12
    assert peak[0] == 2 and app.state.engine.decodes_peak == 2


def test_waiting_for_a_decode_slot_times_out_as_503(serve_index, searcher, monkeypatch):
    import threading

    from deephash_faiss import serve
    from deephash_faiss.serve import create_app

    gate = threading.Event()
    real = serve.decode_image_bytes
    monkeypatch.setattr(serve, "decode_image_bytes", lambda *a: (gate.wait(10), real(*a))[1])
    app = create_app(serve_index, searcher=searcher, max_decodes=1, request_timeout_s=0.5)
    with _client(app) as c:
        first = {}
        t = threading.Thread(target=lambda: first.setdefault(
            "r", c.post("/search", files={"image": ("q.png", _png_bytes(), "image/png")})))
        t.start()
        deadline = time.monotonic() + 5
        while app.state.engine.decodes_active < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = c.post("/search", files={"image": ("q.png", _png_bytes(), "image/png")})
        gate.set()
        t.join(10)
    assert second.status_code == 503 and "decode" in second.json()["detail"]
    assert first["r"].status_code == 200


# ---------------------------------------------------------------- a new generation on disk

@pytest.fixture
def own_index(serve_index, tmp_path):
    """A private copy of the serve index (this test changes it)."""
    import shutil

    dst = str(tmp_path / "index")
    shutil.copytree(serve_index, dst)
    return dst


def test_reload_after_remove_and_compact(own_index):
    from deephash_faiss import maintain
    from deephash_faiss.serve import create_app

    app = create_app(own_index, device="cpu", reload_check_s=0)
    engine = app.state.engine
    with _client(app) as c:
        assert c.get("/images/3").status_code == 200
        assert 3 in [r["id"] for r in c.post("/search", json={"id": 4, "mode": "es", "k": 60}).json()["results"]]
        gen = c.get("/info").json()["generation"]

        maintain.remove(own_index, ids=[3])
        c.get("/healthz")  # any request notices the new manifest; the reopen runs in the background
        engine.wait_reloaded()
        assert c.get("/info").json()["generation"] > gen
        assert c.get("/images/3").status_code == 404
        assert c.post("/search", json={"id": 3}).status_code == 422
        body = c.post("/search", json={"id": 4, "mode": "es", "k": 59}).json()
        assert 3 not in [r["id"] for r in body["results"]] and len(body["results"]) == 59
        assert c.get("/healthz").json() == {"status": "ok", "count": 60, "live_count": 59}

        maintain.compact(own_index)  # ids renumbered: 59 rows 0..58
        c.get("/healthz")
        engine.wait_reloaded()
        assert c.get("/healthz").json() == {"status": "ok", "count": 59, "live_count": 59}
        assert c.get("/images/59").status_code == 404
        assert c.post("/search", json={"id": 4, "mode": "es", "k": 59}).status_code == 200
        assert engine.reloads == 2 and engine.reload_error is None


def test_requests_in_flight_finish_on_their_generation(own_index):
    """A search held on the worker while the index changes and the server swaps to the new
    generation: it still answers 200 from the old one; the next request sees the new one."""
    import threading

    from deephash_faiss import maintain
    from deephash_faiss.serve import create_app

    app = create_app(own_index, device="cpu", reload_check_s=0, request_timeout_s=30)
    engine = app.state.engine
    old_view = engine.view
    gate, entered = threading.Event(), threading.Event()
    real = old_view.search

    def held(*a, **kw):
        entered.set()
        gate.wait(20)
        return real(*a, **kw)

    old_view.search = held
    with _client(app) as c:
        first = {}
        t = threading.Thread(target=lambda: first.setdefault(
            "r", c.post("/search", json={"id": 4, "mode": "es", "k": 60})))
        t.start()
        assert entered.wait(20)
        maintain.remove(own_index, ids=[3])
        c.get("/healthz")
        engine.wait_reloaded()
        assert engine.view is not old_view
        after = c.post("/search", json={"id": 4, "mode": "es", "k": 59}).json()
        gate.set()
        t.join(20)
    r = first["r"]
    assert r.status_code == 200 and 3 in [x["id"] for x in r.json()["results"]]
    assert r.json()["generation"] < after["generation"]
    assert 3 not in [x["id"] for x in after["results"]]


def test_a_broken_new_generation_keeps_the_old_one_serving(own_index):
    from deephash_faiss.serve import create_app

    app = create_app(own_index, device="cpu", reload_check_s=0)
    engine = app.state.engine
    with _client(app) as c:
        mpath = os.path.join(own_index, "manifest.json")
        with open(mpath) as f:
            m = json.load(f)
        m["generation"] = m.get("generation", 1) + 1
        m["index"]["file"] = "codes-missing.index"
        with open(mpath + ".new", "w") as f:
            json.dump(m, f)
        os.replace(mpath + ".new", mpath)
        c.get("/healthz")
        engine.wait_reloaded()
        health = c.get("/healthz").json()
        assert health["status"] == "ok" and health["live_count"] == 60
        assert "reload_error" in health and "\n" not in health["reload_error"]
        assert c.post("/search", json={"id": 1}).status_code == 200


# ---------------------------------------------------------------- tryout findings (twenty-eighth session)

_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


def _no_eps(monkeypatch):
    """Record any attempt of PIL's EPS plugin (which runs Ghostscript) to open a file."""
    from PIL import EpsImagePlugin

    tried = []
    real = EpsImagePlugin.EpsImageFile._open

    def spy(self):
        tried.append(True)
        return real(self)

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy)
    return tried


def test_postscript_upload_is_415_and_never_reaches_ghostscript(client, monkeypatch):
    tried = _no_eps(monkeypatch)
    resp = client.post("/search", files={"image": ("x.eps", _EPS, "application/postscript")})
    assert resp.status_code == 415 and "not an image dhf reads" in resp.json()["detail"]
    assert "gs" not in resp.json()["detail"] and "/tmp" not in resp.json()["detail"]
    assert tried == []


def test_postscript_named_jpg_is_skipped_at_decode_without_ghostscript(tmp_path, monkeypatch):
    from deephash_faiss.data import ImageDecodeError, decode_image, probe_load_size

    tried = _no_eps(monkeypatch)
    p = tmp_path / "photo.jpg"
    p.write_bytes(_EPS)
    with pytest.raises(ImageDecodeError, match="not an image dhf reads"):
        decode_image(str(p), 32)
    assert probe_load_size([str(p)], 64) == 64
    assert tried == []


@pytest.mark.parametrize("url", ["/images/1_0", "/images/+1", "/images/%201", "/images/1.0",
                                 "/images/\u0661", "/images/\uff11", "/images/-0x1", "/images/-1?thumb=abc",
                                 "/images/1?thumb=abc"])
def test_image_ids_are_plain_integers_with_a_one_line_422(client, url):
    resp = client.get(url)
    assert resp.status_code == 422, (url, resp.status_code)
    assert isinstance(resp.json()["detail"], str) and "\n" not in resp.json()["detail"]


@pytest.mark.parametrize("body", [{"id": "1_0"}, {"id": "\uff11"}, {"id": 1, "k": "\u0663"}, {"id": 1, "k": "1_0"},
                                  {"id": 1, "mode": 0}, {"id": 1, "mode": False}, {"id": 1, "mode": []},
                                  {"id": 1, "hds_mode": 3}])
def test_json_fields_of_the_wrong_kind_are_422(client, body):
    resp = client.post("/search", json=body)
    assert resp.status_code == 422, (body, resp.text)
    assert isinstance(resp.json()["detail"], str)


def test_integers_with_spaces_around_are_accepted(client):
    resp = client.post("/search?k=%203%20", json={"id": 2, "mode": "bcs"})
    assert resp.status_code == 200 and len(resp.json()["results"]) == 3


def test_error_messages_name_this_api_not_the_cli(client):
    detail = client.post("/search", json={"id": 1, "k": 0}).json()["detail"]
    assert "k must be" in detail and "(-k)" not in detail and "--" not in detail


def test_413_names_the_configured_limit(client):
    big = b"\0" * (UPLOAD_LIMIT + 1000)
    detail = client.post("/search", files={"image": ("big.png", big, "image/png")}).json()["detail"]
    assert f"the limit is {UPLOAD_LIMIT} bytes" in detail or f"more than {UPLOAD_LIMIT} bytes" in detail
    resp = client.post("/search", content=b"{\"id\": 1, \"pad\": \"" + b"x" * 100_000 + b"\"}",
                       headers={"content-type": "application/json"})
    assert resp.status_code == 413 and resp.json()["detail"].startswith("JSON body too large")


def test_a_second_file_part_is_a_clear_400(client):
    resp = client.post("/search", files=[("image", ("q.png", _png_bytes(), "image/png")),
                                         ("k", ("k.txt", b"3", "text/plain"))])
    assert resp.status_code == 400
    detail = resp.json()["detail"]
    assert "400:" not in detail and "only 'image' may be a file" in detail


def test_head_requests_for_monitors(client):
    assert client.head("/healthz").status_code == 200
    assert client.head("/").status_code == 200


def test_reload_error_clears_when_the_served_manifest_is_back(own_index):
    from deephash_faiss.serve import create_app

    app = create_app(own_index, device="cpu", reload_check_s=0)
    engine = app.state.engine
    mpath = os.path.join(own_index, "manifest.json")
    with open(mpath, "rb") as f:
        good = f.read()
    with _client(app) as c:
        with open(mpath + ".tmp", "wb") as f:
            f.write(b'{"broken":')
        os.replace(mpath + ".tmp", mpath)
        c.get("/healthz")
        engine.wait_reloaded()
        assert "reload_error" in c.get("/healthz").json()
        engine._failed = None  # skip the 10 s retry pause
        with open(mpath + ".tmp", "wb") as f:
            f.write(good)
        os.replace(mpath + ".tmp", mpath)
        c.get("/healthz")
        engine.wait_reloaded()
        assert c.get("/healthz").json() == {"status": "ok", "count": 60, "live_count": 60}


def test_slots_bound_holders_and_time_out():
    import asyncio

    from deephash_faiss.serve import Busy, _Slots

    async def scenario():
        slots, active, peak = _Slots(2, 10, 5.0), [0], [0]

        async def holder():
            async with slots.hold("uploads waiting", "upload slot"):
                active[0] += 1
                peak[0] = max(peak[0], active[0])
                await asyncio.sleep(0.05)
                active[0] -= 1

        await asyncio.gather(*(holder() for _ in range(7)))
        assert peak[0] == 2
        short = _Slots(1, 10, 0.1)
        async with short.hold("uploads waiting", "upload slot"):
            with pytest.raises(Busy, match="no upload slot"):
                async with short.hold("uploads waiting", "upload slot"):
                    pass
        full = _Slots(1, 0, 1.0)
        with pytest.raises(Busy, match="too many uploads waiting"):
            async with full.hold("uploads waiting", "upload slot"):
                pass

    asyncio.run(scenario())


class _FakeRequest:
    def __init__(self, chunks, headers=None):
        self.headers, self._chunks = headers or {}, chunks

    def stream(self):
        return self._chunks()


def test_a_stalled_body_is_408_and_a_vanished_client_is_quiet():
    import asyncio

    from fastapi import HTTPException
    from starlette.requests import ClientDisconnect

    from deephash_faiss.serve import ClientGone, _read_body_limited

    async def stalls():
        yield b"--XX\r\n"
        await asyncio.sleep(30)
        yield b"never"

    async def vanishes():
        yield b"--XX\r\n"
        raise ClientDisconnect()

    async def whole():
        yield b"ab"
        yield b"cd"

    async def scenario():
        with pytest.raises(HTTPException) as err:
            await _read_body_limited(_FakeRequest(stalls), 1000, idle_s=0.1)
        assert err.value.status_code == 408
        with pytest.raises(ClientGone):
            await _read_body_limited(_FakeRequest(vanishes), 1000)
        assert await _read_body_limited(_FakeRequest(whole, {"content-length": "4"}), 1000) == b"abcd"
        for bad in ("x", "-1", "1_0"):
            with pytest.raises(HTTPException) as err:
                await _read_body_limited(_FakeRequest(whole, {"content-length": bad}), 1000)
            assert err.value.status_code == 400

    asyncio.run(scenario())


def test_listen_socket_errors_are_one_line():
    import socket

    from deephash_faiss.errors import DhfError
    from deephash_faiss.serve import listen_socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DhfError, match=f"cannot listen on 127.0.0.1:{port}: the port is in use"):
            listen_socket("127.0.0.1", port)
    with pytest.raises(DhfError, match="unknown host"):
        listen_socket("999.1.1.1", 8000)
    s = listen_socket("127.0.0.1", 0)
    s.close()


def test_cli_serve_busy_port_and_bad_numbers(serve_index):
    import socket

    from click.testing import CliRunner

    from deephash_faiss.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        out = CliRunner().invoke(main, ["serve", "--index", serve_index, "--device", "cpu", "--port", str(port)])
        assert out.exit_code == 1
        assert out.output.strip() == f"Error: cannot listen on 127.0.0.1:{port}: the port is in use"
        assert time.monotonic() - t0 < 5  # refused before the index loads
    for opt, value in (("--max-upload-mb", "nan"), ("--max-upload-mb", "inf"), ("--timeout", "nan"),
                       ("--timeout", "-inf")):
        out = CliRunner().invoke(main, ["serve", "--index", serve_index, opt, value])
        assert out.exit_code == 1 and out.output.count("\n") == 1 and "unexpected" not in out.output, out.output
    out = CliRunner().invoke(main, ["serve", "--index", os.path.join(serve_index, "manifest.json")])
    assert out.exit_code == 1 and "is a file, not an index directory" in out.output


def test_serve_hosts_ignore_empty_names():
    from deephash_faiss.serve import serve_hosts

    assert "" not in serve_hosts("127.0.0.1", ["", " "])


def test_sigterm_closes_a_stalled_upload_within_the_grace_period(serve_index):
    """A client that stops mid-body does not keep `dhf serve` alive after SIGTERM."""
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    from serve_helpers import free_port

    from deephash_faiss.serve import GRACEFUL_SHUTDOWN_S

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "deephash_faiss.cli", "serve", "--index", serve_index,
                             "--device", "cpu", "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("dhf serve did not start")
                time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port)) as stall:
            stall.sendall(b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; "
                          b"boundary=XX\r\nContent-Length: 100000\r\n\r\n--XX\r\n")
            time.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(GRACEFUL_SHUTDOWN_S + 10)
            assert time.monotonic() - t0 < GRACEFUL_SHUTDOWN_S + 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_refused_uploads_are_freed_without_waiting_for_the_garbage_collector(serve_index, searcher):
    """A refused upload's bytes went into reference cycles (exception frames) and stayed until
    the next garbage collection: a server's memory grew by each one (2.8 GB after 40 refused
    19 MB uploads, benchmarks/bench_upload_memory.py). Through uvicorn and a real socket,
    with the collector off: what the server allocated for 20 refused uploads and still holds."""
    import gc
    import http.client
    import tracemalloc

    from serve_helpers import server_in_thread

    from deephash_faiss.serve import create_app

    app = create_app(serve_index, searcher=searcher, max_upload_bytes=2_000_000)
    blob = os.urandom(1_000_000)  # not an image: 415 after decoding was tried
    body = (b"--XX\r\nContent-Disposition: form-data; name=\"image\"; filename=\"r.bin\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + blob + b"\r\n--XX--\r\n")

    def post(port: int) -> int:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("POST", "/search", body, {"Content-Type": "multipart/form-data; boundary=XX", "Host": "localhost"})
        status = c.getresponse().status
        c.close()
        return status

    with server_in_thread(app) as port:
        try:
            assert post(port) == 415
            gc.collect()
            gc.disable()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(20):
                assert post(port) == 415
            time.sleep(0.2)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            gc.enable()
    assert held < 5 * len(blob), held  # 20 uploads kept would be >= 20 MB (each is held 2-3 times)
