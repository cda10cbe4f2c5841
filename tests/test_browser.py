"""The search page in a real browser: Playwright for Python driving Debian's Chromium.

Skipped (with the reason) when the ``playwright`` package or ``/usr/bin/chromium`` is missing.
Set ``DHF_UPDATE_SCREENSHOT=1`` to rewrite ``docs/serve-screenshot.png``.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_helpers import build_tiny_index, server_in_thread, write_query  # noqa: E402

CHROMIUM = os.environ.get("DHF_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCREENSHOT = os.path.join(REPO, "docs", "serve-screenshot.png")

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip("playwright is not installed (pip install playwright)", allow_module_level=True)
if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="session")
def serve_index(tmp_path_factory):
    return build_tiny_index(str(tmp_path_factory.getbasetemp() / "dhf-serve"))


@pytest.fixture(scope="module")
def server(serve_index):
    """A uvicorn server on 127.0.0.1 (free port) in a thread; yields its base URL."""
    from deephash_faiss.serve import create_app

    try:
        with server_in_thread(create_app(serve_index, device="cpu")) as port:
            yield f"http://127.0.0.1:{port}"
    except RuntimeError as err:
        pytest.fail(str(err))


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        except Exception as err:  # noqa: BLE001 - a browser that cannot start is an environment problem
            pytest.skip(f"Chromium at {CHROMIUM} did not start: {str(err).splitlines()[0][:200]}")
        yield b
        b.close()


def _labels(page):
    return page.eval_on_selector_all("#grid .result", "els => els.map(e => e.dataset.label)")


def _ids(page):
    return page.eval_on_selector_all("#grid .result", "els => els.map(e => Number(e.dataset.id))")


def test_page_upload_and_search_by_id(server, browser, tmp_path):
    k = 8
    query = write_query(str(tmp_path / "circle-query.png"), 0, seed=21)
    page = browser.new_page(viewport={"width": 1280, "height": 860}, device_scale_factor=1)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/", wait_until="domcontentloaded")
    page.wait_for_function("document.querySelector('#index-info').textContent.includes('images')", timeout=15_000)
    assert "60" in page.inner_text("#index-info")

    page.fill("#k", str(k))
    page.check('input[name="mode"][value="hds"]', force=True)
    page.set_input_files("#file", query)  # the page searches as soon as a file is picked
    page.wait_for_function("document.body.dataset.searches === '1'", timeout=20_000)
    assert page.locator("#grid .result").count() == k
    assert page.locator("#error").is_hidden()

    with open(query, "rb") as f:
        api = httpx.post(server + "/search", files={"image": ("circle-query.png", f.read(), "image/png")},
                         data={"mode": "hds", "k": str(k), "radius": "3", "max_candidates": "10000"}, timeout=30)
    api.raise_for_status()
    expect = api.json()["results"]
    assert _labels(page) == [r["label"] for r in expect]
    assert _ids(page) == [r["id"] for r in expect]
    # every thumbnail loaded
    page.wait_for_function("[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)",
                           timeout=10_000)
    # Hamming and L2 shown per result
    assert page.locator("#grid .result .hamming").first.inner_text() == str(expect[0]["hamming"])

    # switching mode searches again (ES)
    page.check('input[name="mode"][value="es"]', force=True)
    page.wait_for_function("document.body.dataset.searches === '2'", timeout=20_000)
    es = httpx.post(server + "/search", files={"image": ("q.png", open(query, "rb").read(), "image/png")},
                    data={"mode": "es", "k": str(k)}, timeout=30).json()
    assert _ids(page) == [r["id"] for r in es["results"]]

    # click "search with this" on the third result: query by database id
    target = _ids(page)[2]
    page.locator("#grid .result").nth(2).locator("button.by-id").click()
    page.wait_for_function("document.body.dataset.searches === '3'", timeout=20_000)
    assert f"#{target}" in page.inner_text("#query-name")
    by_id = httpx.post(server + "/search", json={"id": target, "mode": "es", "k": k}, timeout=30).json()
    assert _ids(page) == [r["id"] for r in by_id["results"]]
    assert _labels(page) == [r["label"] for r in by_id["results"]]

    # back to HDS on that id and a bad k shows a clear message instead of results
    page.check('input[name="mode"][value="hds"]', force=True)
    page.wait_for_function("document.body.dataset.searches === '4'", timeout=20_000)
    page.wait_for_function("[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)",
                           timeout=10_000)
    shot = SCREENSHOT if os.environ.get("DHF_UPDATE_SCREENSHOT") == "1" else str(tmp_path / "serve.png")
    os.makedirs(os.path.dirname(shot), exist_ok=True)
    page.screenshot(path=shot, full_page=True)
    assert os.path.getsize(shot) > 10_000

    page.fill("#k", "5000")
    page.click("#search-btn")
    page.wait_for_selector("#error:not([hidden])", timeout=10_000)
    assert "k must be between 1 and 60" in page.inner_text("#error")
    assert not errors, errors
    page.close()
