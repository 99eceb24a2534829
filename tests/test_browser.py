"""End to end in a real browser: Playwright drives Debian's headless Chromium against the app.

CI installs Chromium (.ci/run); elsewhere the test needs /usr/bin/chromium or $CHROMIUM
(`apt-get install chromium`). Screenshots of both tabs, light and dark, desktop and phone, land
in $MERGELINE_SCREENSHOTS (default: the test's tmp dir).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from app import DEMO_MOE_EXAMPLE

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
VIEWPORTS = {"desktop": {"width": 1280, "height": 1000}, "phone": {"width": 390, "height": 844}}

if not CHROMIUM and os.environ.get("CI"):
    raise RuntimeError("CI must provide Chromium for the browser test (.ci/run installs it)")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="no Chromium here; .ci/run installs it for CI")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("MERGELINE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def graph_frame(page, host: str):
    """The family tree's frame inside `host` (an element id), once vis-network has drawn it."""
    page.locator(f"#{host} iframe").wait_for(timeout=60_000)
    handle = page.locator(f"#{host} iframe").element_handle()
    frame = handle.content_frame()
    frame.wait_for_function("() => window.network && network.body.nodeIndices.length > 0", timeout=60_000)
    return frame


def frame_fits_its_graph(page, host: str) -> bool:
    frame = graph_frame(page, host)
    needed = frame.evaluate("() => document.getElementById('lineage').getBoundingClientRect().bottom")
    given = page.locator(f"#{host} iframe").evaluate("el => el.getBoundingClientRect().height")
    return needed <= given + 1


def test_demo_merge_and_lineage_in_the_browser(browser, app_url, shots):
    page = browser.new_page(viewport=VIEWPORTS["desktop"])
    page.goto(app_url)
    page.get_by_role("button", name="Validate").click()
    page.locator("#report").get_by_text("The config is valid").wait_for(timeout=60_000)
    assert frame_fits_its_graph(page, "preview")  # "(this merge)" is not cut off
    assert "(this merge)" in graph_frame(page, "preview").evaluate("() => network.body.nodeIndices")

    page.get_by_role("button", name="Merge", exact=True).click()
    page.locator("#merge-result").get_by_text("Merged").wait_for(timeout=120_000)
    log = page.locator("#merge-log textarea")
    assert "39/39" in log.input_value() and "Done:" in log.input_value()
    page.wait_for_timeout(300)
    # the log shows its last line ("Done") without scrolling
    assert log.evaluate("t => t.scrollHeight - t.scrollTop - t.clientHeight <= 4")
    page.screenshot(path=str(shots / "merge-tab-merged.png"), full_page=True)

    # a failed action replaces what the last one showed
    page.locator("#merge-log").scroll_into_view_if_needed()
    page.evaluate("""() => { const view = document.querySelector('.cm-content');
        view.focus(); document.execCommand('selectAll'); document.execCommand('insertText', false, 'merge_method: nope'); }""")
    page.get_by_role("button", name="Validate").click()
    page.locator("#report").get_by_text("unknown method").wait_for(timeout=30_000)
    assert "The config is valid" not in page.locator("#report").inner_text()
    assert page.locator("#preview iframe").count() == 0
    page.close()


def test_mixture_of_experts_example_in_the_browser(browser, app_url, shots):
    page = browser.new_page(viewport=VIEWPORTS["desktop"])
    page.goto(app_url)
    page.get_by_label("Examples").click()
    page.get_by_role("option", name=DEMO_MOE_EXAMPLE).click()
    page.locator(".cm-content").get_by_text("gate_mode: hidden").wait_for(timeout=30_000)
    page.get_by_role("button", name="Validate").click()
    page.locator("#report").get_by_text("output: MixtralForCausalLM").wait_for(timeout=60_000)
    page.get_by_role("button", name="Merge", exact=True).click()
    page.locator("#merge-result").get_by_text("Merged").wait_for(timeout=120_000)
    log = page.locator("#merge-log textarea").input_value()
    assert "computing routers (hidden)" in log and "routers: layer 4/4" in log and "Done:" in log
    page.screenshot(path=str(shots / "merge-tab-moe.png"), full_page=True)
    page.close()


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("device", ["desktop", "phone"])
def test_both_tabs_read_in_every_scheme_and_screen(device, scheme, browser, app_url, shots):
    page = browser.new_page(viewport=VIEWPORTS[device], color_scheme=scheme)
    page.goto(app_url)
    page.locator("#validate").wait_for()
    page.screenshot(path=str(shots / f"merge-tab-{device}-{scheme}.png"), full_page=True)

    page.get_by_role("tab", name="Lineage").click()
    frame = graph_frame(page, "lineage-graph")  # drawn on arrival, from the offline demo
    node_ids = frame.evaluate("() => network.body.nodeIndices")
    assert "mlabonne/NeuralBeagle14-7B" in node_ids and "mlabonne/Beagle14-7B" in node_ids
    assert frame_fits_its_graph(page, "lineage-graph")
    assert not page.locator("#lineage-token").is_visible()  # no token box while the demo is on
    assert page.locator("#lineage-composition").inner_text().count("%") >= 2

    # readable in this scheme: dark ink on light paper, light ink on dark paper
    ink, paper = frame.evaluate("""() => { const s = getComputedStyle(document.getElementById('legend'));
        return [s.color, getComputedStyle(document.body).backgroundColor]; }""")
    bright = lambda rgb: sum(int(v) for v in rgb[rgb.index("(") + 1:-1].split(",")[:3]) / 3  # noqa: E731
    assert (bright(ink) < 100 < 150 < bright(paper)) if scheme == "light" else (bright(paper) < 100 < 150 < bright(ink))
    assert frame.evaluate("() => network.getScale()") >= 0.59  # labels are not shrunk past reading
    assert all("&gt;" not in e["title"] and "->" in e["title"] for e in frame.evaluate("() => edges.get()"))

    # the wheel scrolls the page; it zooms only after a click on the graph
    before = frame.evaluate("() => network.getScale()")
    box = page.locator("#lineage-graph iframe").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -300)
    page.wait_for_timeout(200)
    assert frame.evaluate("() => network.getScale()") == before

    # every column of the models table is there to scroll to, on a phone too
    viewport = page.locator("#lineage-models .virtual-table-viewport")
    assert viewport.evaluate("v => getComputedStyle(v).overflowX") == "auto"
    assert page.locator("#lineage-models th").count() == 8
    page.locator("#lineage-graph").scroll_into_view_if_needed()
    page.wait_for_timeout(300)
    page.screenshot(path=str(shots / f"lineage-tab-{device}-{scheme}.png"), full_page=True)

    page.locator("#model-id textarea, #model-id input").first.fill("")
    page.get_by_role("button", name="Draw the family tree").click()
    page.locator("#lineage-graph").get_by_text("enter a Hub model id").wait_for(timeout=30_000)
    assert "**Error" not in page.locator("#lineage-graph").inner_text()
    page.close()
