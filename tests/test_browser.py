"""End to end in a real browser: Playwright drives Debian's headless Chromium against the app.

CI installs Chromium (.ci/run); elsewhere the test needs /usr/bin/chromium or $CHROMIUM.
Screenshots of both tabs land in $MERGELINE_SCREENSHOTS (default: the test's tmp dir).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

if not CHROMIUM and os.environ.get("CI"):
    raise RuntimeError("CI must provide Chromium for the browser test (.ci/run installs it)")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="no Chromium here; .ci/run installs it for CI")


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1800})
        page.goto(app_url)
        yield page
        browser.close()


def test_demo_merge_and_lineage_in_the_browser(page, tmp_path):
    shots = Path(os.environ.get("MERGELINE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.get_by_role("button", name="Merge", exact=True).click()
    result = page.locator("#merge-result")
    result.get_by_text("Merged").wait_for(timeout=120_000)
    assert "39/39" in page.locator("#merge-log textarea").input_value()
    page.screenshot(path=str(shots / "merge-tab.png"), full_page=True)

    page.get_by_role("tab", name="Lineage").click()
    page.get_by_role("button", name="Draw the family tree").click()
    frame = page.frame_locator("#lineage-graph iframe")
    frame.locator("#lineage canvas").wait_for(timeout=60_000)
    # vis-network draws on a canvas: ask it which nodes it holds
    frame.locator("#lineage").wait_for()
    graph_frame = next(f for f in page.frames if f.url == "about:srcdoc")
    graph_frame.wait_for_function("() => window.network && network.body.nodeIndices.length > 5")
    node_ids = graph_frame.evaluate("() => network.body.nodeIndices")
    assert "mlabonne/NeuralBeagle14-7B" in node_ids and "mlabonne/Beagle14-7B" in node_ids
    page.wait_for_timeout(500)
    page.screenshot(path=str(shots / "lineage-tab.png"), full_page=True)
