"""The search page in a real headless Chromium (Debian's ``chromium`` package, driven by Playwright).

``make test`` installs Chromium when ``/usr/bin/chromium`` is missing. This test FAILS (never skips)
when the browser or Playwright is missing: a page nobody has seen render is not tested.

It also writes the README's picture, ``docs/screenshot.png`` (``TPAS_SCREENSHOT`` names another
file), so the picture always shows the page as it is: over a small generated mini-PAB gallery and
the untrained ``lite-tiny`` test model (the ranking in it is arbitrary). ``TPAS_BROWSER_RUN=runs/demo``
uses a demo run's index, model and examples instead::

    TPAS_BROWSER_RUN=runs/demo TPAS_BROWSER_QUERY="a person in a red top is crawling on all fours" \
    pytest tests/test_browser.py
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("TPAS_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage"]
REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = Path(os.environ.get("TPAS_SCREENSHOT") or REPO / "docs" / "screenshot.png")
TOKEN = "browser-test-token-0123456789"

pytestmark = pytest.mark.browser


def _require_browser() -> None:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's `chromium` package "
                    "(`make test` does: apt-get install -y chromium)", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the `playwright` Python package is missing: pip install -e '.[dev]'", pytrace=False)


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        yield chromium
        chromium.close()


def open_page(browser, url: str, errors: list[str]):
    context = browser.new_context(viewport={"width": 1200, "height": 760})
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" and "401" not in msg.text else None)
    page.goto(url, wait_until="networkidle")
    return page


def search_and_wait(page, query: str | None = None) -> None:
    page.evaluate("() => { delete document.body.dataset.state; }")
    if query is not None:
        page.fill("#query", query)
        page.click("#go")
    page.wait_for_selector("body[data-state=done]", timeout=30_000)


def test_page_renders_results_in_chromium_and_writes_the_readme_picture(browser, search_engine, tmp_path):
    from tpas.serve.app import create_app
    from tpas.serve.run import start_in_thread

    engine, examples, default_rerank = search_engine
    query = os.environ.get("TPAS_BROWSER_QUERY") or examples[0]
    server = start_in_thread(create_app(engine, examples=examples, default_rerank=default_rerank))
    shot = tmp_path / "screenshot.png"
    errors: list[str] = []
    try:
        page = open_page(browser, server.url, errors)
        assert page.title().startswith("tpas")
        assert page.locator("#examples .ex").count() == len(examples)
        # the re-rank box starts as the model's validation says (the test model records nothing: off)
        assert page.is_checked("#rerank") == (default_rerank > 0)

        # 1) an example query, re-ranked with ITM, by clicking its chip
        page.check("#rerank")
        page.locator("#examples .ex").last.click()
        page.wait_for_selector("body[data-state=done]", timeout=30_000)
        assert "re-ranked" in page.inner_text("#status")
        assert page.input_value("#query") == examples[-1]
        wait_for_images(page)

        # 2) a query the model cannot read: answered, with a notice on the page
        search_and_wait(page, "😀🏃")
        assert "the model knows no word of this query" in page.inner_text("#status")

        # 3) a typed query in the page's default state: the picture kept for the README
        page.goto(server.url, wait_until="networkidle")
        search_and_wait(page, query)
        widths = wait_for_images(page)
        assert len(widths) == min(10, len(engine)), widths
        status = page.inner_text("#status")
        assert "results for" in status and "ms" in status and "Note:" not in status
        assert page.inner_text("#results .card .rank").strip() == "#1"
        assert "q=" in page.url  # the query is in the address, so it can be shared
        page.screenshot(path=str(shot), full_page=True)
    finally:
        server.stop()
    assert not errors, errors
    assert shot.stat().st_size > 10_000
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)


def test_page_with_a_token_asks_for_it_and_shows_images(browser, search_engine):
    from tpas.serve.app import create_app
    from tpas.serve.run import start_in_thread

    engine, examples, _ = search_engine
    server = start_in_thread(create_app(engine, examples=examples, token=TOKEN, default_rerank=4))
    errors: list[str] = []
    try:
        page = open_page(browser, server.url, errors)
        assert page.is_visible("#auth")  # /api/examples answered 401: the page asks
        page.fill("#token", TOKEN)
        page.click("#auth button")
        page.wait_for_selector("#examples .ex")
        assert page.is_hidden("#auth") and page.is_checked("#rerank")  # this server defaults to re-ranking
        assert page.input_value("#rerank-k") == "4"
        search_and_wait(page, examples[0])
        assert "ITM re-ranked top 4" in page.inner_text("#status")
        widths = wait_for_images(page)  # fetched with the token, shown from blob: URLs
        assert len(widths) == min(10, len(engine))
        assert all(src.startswith("blob:") for src in page.eval_on_selector_all("#results img", "i => i.map(x => x.src)"))
    finally:
        server.stop()
    assert not errors, errors


def wait_for_images(page) -> list[int]:
    """Wait until every result image finished loading; return their decoded widths (all > 0)."""
    page.wait_for_function(
        "() => { const im = [...document.querySelectorAll('#results img')];"
        " return im.length > 0 && im.every(i => i.complete && i.naturalWidth > 0); }", timeout=30_000)
    widths = page.eval_on_selector_all("#results img", "ims => ims.map(i => i.naturalWidth)")
    assert widths and all(w > 0 for w in widths), widths
    return widths


@pytest.fixture(scope="module")
def search_engine(tmp_path_factory):
    """(engine, examples, page re-rank default): a real SearchEngine over the test gallery of a small
    generated mini-PAB indexed with ``lite-tiny``, or over a demo run folder (``index/``, ``model/``,
    ``examples.txt``) named by ``TPAS_BROWSER_RUN``."""
    from tpas.serve.run import load_engine, read_examples, validated_rerank

    run = os.environ.get("TPAS_BROWSER_RUN")
    if run:
        examples = read_examples(Path(run) / "examples.txt") or ["a person is walking"]
        engine = load_engine(Path(run) / "index", Path(run) / "model")
        return engine, examples[:6], validated_rerank(engine.model)
    from tpas.data.datasets import load_eval
    from tpas.data.synth.writer import generate
    from tpas.models import create_model
    from tpas.search.engine import SearchEngine
    from tpas.search.index import build_index

    folder = tmp_path_factory.mktemp("browser")
    generate(folder / "minipab", identities=12, seed=5, test_fraction=0.5)
    evalset = load_eval(folder / "minipab", "pab", "test")
    model = create_model("lite-tiny")
    build_index(model, evalset.gallery, evalset.root, folder / "index", progress=False)
    examples = [q.caption for q in evalset.queries[:3]]
    return SearchEngine(folder / "index", model), examples, validated_rerank(model)
