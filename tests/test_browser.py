"""The search page in a real headless Chromium (Debian's ``chromium`` package, driven by Playwright).

``make test`` installs Chromium when ``/usr/bin/chromium`` is missing. This test FAILS (never skips)
when the browser or Playwright is missing: a page nobody has seen render is not tested.

The screenshot goes to ``tmp_path``; set ``TPAS_SCREENSHOT=docs/screenshot.png`` to write it
somewhere kept. The README picture is made over the demo's index instead of the tiny one::

    TPAS_BROWSER_RUN=runs/demo TPAS_SCREENSHOT=docs/screenshot.png \
    TPAS_BROWSER_QUERY="a person in a red top is crawling on all fours" pytest tests/test_browser.py
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

pytestmark = pytest.mark.browser


def _require_browser() -> None:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's `chromium` package "
                    "(`make test` does: apt-get install -y chromium)", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the `playwright` Python package is missing: pip install -e '.[dev]'", pytrace=False)


def test_page_renders_results_in_chromium(tiny_search_engine, tmp_path):
    _require_browser()
    from playwright.sync_api import sync_playwright

    from tpas.serve.app import create_app
    from tpas.serve.run import start_in_thread

    engine, examples = tiny_search_engine
    example = os.environ.get("TPAS_BROWSER_QUERY") or examples[0]
    server = start_in_thread(create_app(engine, examples=examples))
    shot = tmp_path / "screenshot.png"
    errors: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
            try:
                context = browser.new_context(viewport={"width": 1200, "height": 760})
                page = context.new_page()
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
                page.goto(server.url, wait_until="networkidle")
                assert page.title().startswith("tpas")
                assert page.locator("#examples .ex").count() == len(examples)

                # 1) an example query, re-ranked with ITM (the page's default), by clicking its chip
                assert page.is_checked("#rerank")
                page.locator("#examples .ex").last.click()
                page.wait_for_selector("body[data-state=done]", timeout=30_000)
                assert "re-ranked" in page.inner_text("#status")
                assert page.input_value("#query") == examples[-1]
                wait_for_images(page)

                # 2) a typed query, ITC only: the picture kept for the README
                page.evaluate("() => { delete document.body.dataset.state; }")
                page.fill("#query", example)
                page.uncheck("#rerank")
                page.click("#go")
                page.wait_for_selector("body[data-state=done]", timeout=30_000)
                widths = wait_for_images(page)
                assert len(widths) == min(10, engine_size(engine)), widths
                status = page.inner_text("#status")
                assert "results for" in status and "ms" in status and "ITC only" in status
                assert page.inner_text("#results .card .rank").strip() == "#1"
                assert "q=" in page.url  # the query is in the address, so it can be shared
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
    finally:
        server.stop()
    assert not errors, errors
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("TPAS_SCREENSHOT")
    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep)


def wait_for_images(page) -> list[int]:
    """Wait until every result image finished loading; return their decoded widths (all > 0)."""
    page.wait_for_function(
        "() => { const im = [...document.querySelectorAll('#results img')];"
        " return im.length > 0 && im.every(i => i.complete); }", timeout=30_000)
    widths = page.eval_on_selector_all("#results img", "ims => ims.map(i => i.naturalWidth)")
    assert widths and all(w > 0 for w in widths), widths
    return widths


def engine_size(engine) -> int:
    return len(engine)



@pytest.fixture(scope="module")
def tiny_search_engine(tmp_path_factory):
    """A real SearchEngine over a tiny lite-tiny index (built by the helper in test_serve), or over a
    demo run folder (``index/``, ``model/``, ``examples.txt``) named by ``TPAS_BROWSER_RUN``."""
    run = os.environ.get("TPAS_BROWSER_RUN")
    if run:
        from tpas.serve.run import load_engine, read_examples

        examples = read_examples(Path(run) / "examples.txt") or ["a person is walking"]
        return load_engine(Path(run) / "index", Path(run) / "model"), examples[:6]
    from test_serve import build_tiny_engine

    engine = build_tiny_engine(tmp_path_factory.mktemp("browser_index"))
    return engine, ["a woman in a blue coat is running", "a man in a red jacket falls down"]
