"""The dashboard page in a real headless Chromium (Selenium, Debian's chromium through chromedriver; `.ci/run`
installs both): the page shows a `<script>` title and an `<img onerror>` message as text without running them, and
the live page follows a real tiny `h2po train` (10 steps, 2 learner ranks, the tiny MOST checkpoint of
`tests/test_actors.py`; about a minute) on a copy of the imported MovieLens catalog whose every title carries
`<script>` and `<img onerror>` markup (MOST, the preference pairs and H2PO all run on it, `data.catalog=DIR`): the
sampled titles show with their markup as text on the live page and in report.html, and none of it runs. Full-page
screenshots go to artifacts/dashboard.png and artifacts/report.png. The feed, charts, panels, report and server
without a browser: tests/test_dashboard.py.
Run: `python -m pytest tests/test_dashboard_browser.py -q` (about 2 minutes on 2 busy cores).
"""


from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from test_dashboard import (
    ARTIFACTS,
    BOLD_REWARD,
    CHROMEDRIVER,
    CHROMIUM,
    IMG_MESSAGE,
    IMG_TAG,
    MARKED_SUFFIX,
    ROOT,
    SCRIPT_TITLE,
    TINY,
    TOKEN,
    write_feed,
)

from app.cli import main
from dashboard.feed import read_records
from dashboard.report import write_report
from dashboard.server import start_dashboard


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium through chromedriver (Selenium), a tall window so screenshots show the page."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"{CHROMIUM} / {CHROMEDRIVER} missing: apt-get install chromium chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="h2po-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", "--window-size=1400,2300"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CSP_LISTENER_JS})
    yield driver
    driver.quit()


CSP_LISTENER_JS = """window.__cspViolations = []; document.addEventListener('securitypolicyviolation',
    e => window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));"""  # runs before the page's scripts
EMPTY_CHARTS_JS = """return [...document.querySelectorAll('.chart')].filter(div => !(div.data || []).some(
    trace => Array.from(trace.y || []).some(y => y !== null))).map(div => div.id);"""


def wait_for(driver, condition, timeout: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition, f"timed out waiting for {what}")


def text_of(driver, element_id: str) -> str:
    return driver.execute_script(f"const e = document.getElementById('{element_id}'); return e && e.textContent;")


@pytest.mark.slow
def test_page_shows_markup_from_data_as_text(tmp_path, browser):
    """A `<script>` catalog title and an `<img onerror>` error message are shown literally on the live page and in
    the report, and neither runs (window.__pwned stays undefined); a reward name with <b> is legend text. The live
    page needs a token here (given once in the URL, then the cookie), and the page, the served report and the report
    file draw every chart under their Content-Security-Policy without a single violation."""
    write_feed(tmp_path)
    handle = start_dashboard(tmp_path, token=TOKEN)
    try:
        report = write_report(tmp_path)
        for url in (handle.url, handle.url.split("?")[0] + "report.html", report.as_uri()):
            browser.get(url)
            wait_for(browser, lambda d: not d.execute_script(EMPTY_CHARTS_JS), 30, f"charts drawn on {url}")
            assert browser.execute_script("return window.__cspViolations;") == [], url
            seeds = browser.execute_script(
                "return [...document.querySelectorAll('#sample-seeds li')].map(li => li.textContent);")
            assert seeds == [SCRIPT_TITLE, "Alien (1979)"], url
            assert IMG_MESSAGE in text_of(browser, "events"), url
            assert browser.execute_script("return typeof window.__pwned;") == "undefined", url
            assert browser.execute_script("return document.querySelectorAll('#details img, #details script').length")\
                == 0, url
            legend = browser.execute_script("return document.getElementById('chart-rewards').textContent;")
            assert f"reward/{BOLD_REWARD}" in legend, url
    finally:
        handle.stop()


def write_marked_catalog(directory: Path, scratch: Path) -> list[str]:
    """MovieLens imported as every run imports it (into `scratch`/catalog), written to `directory` with
    MARKED_SUFFIX appended to every title (item ids and interactions unchanged); returns the original titles."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from catalog.dataset import load_catalog
    from catalog.schema import write_catalog
    from core.config import load_config

    load_catalog(load_config(TINY).data, scratch)
    source = scratch / "catalog"
    items = pq.read_table(source / "items.parquet")
    titles = items.column("title").to_pylist()
    items = items.set_column(items.schema.get_field_index("title"), "title",
                             pa.array([t + MARKED_SUFFIX for t in titles], pa.string()))
    write_catalog(directory, items, pq.read_table(source / "interactions.parquet"),
                  (source / "LICENSE.txt").read_text())
    return titles


@pytest.fixture(scope="module")
def most_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """The tiny MOST checkpoint (k=8) and logged preference pairs, as in tests/test_actors.py, made on the marked
    catalog (`write_marked_catalog`, passed as data.catalog=DIR); the run directory and the unmarked titles."""
    import torch

    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("dash_run")
    titles = write_marked_catalog(run / "marked_catalog", tmp_path_factory.mktemp("dash_import"))
    overrides = run_overrides(run)
    assert main(["pretrain", "--config", TINY, *overrides]) == 0
    assert main(["data", "preferences", "--out", str(run / "prefs.parquet"), "--config", TINY, *overrides]) == 0
    torch.set_num_threads(threads)
    return run, titles


def run_overrides(run: Path) -> list[str]:
    return [f"out_dir={run}", f"data.catalog={run / 'marked_catalog'}", "threads=1", "requests.k=8"]


def start_training(run: Path, steps: int) -> tuple[subprocess.Popen, list[str]]:
    """`h2po train` on the tiny config in its own process session; its output lines collect in the list."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "train", "--checkpoint", str(run / "most.safetensors"),
                             "--preferences", str(run / "prefs.parquet"), "--steps", str(steps), "--config", TINY,
                             *run_overrides(run), "h2po.checkpoint_every=0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


SCRIPTS_JS = "return [...document.scripts].map(s => [s.parentElement.tagName, s.getAttribute('src'), s.id]);"
OWN_SCRIPTS = {"live": [["HEAD", "plotly.min.js", ""], ["BODY", "static/page.js", ""]],
               "report": [["HEAD", None, ""], ["BODY", None, "h2po-figures"], ["BODY", None, ""]]}


def assert_titles_shown_as_text(driver, titles: set[str], page: str) -> None:
    """The sample panel lists marked catalog titles, markup included, as text (textContent and the visible text);
    neither the <script> nor the <img onerror> of a title ran, and the DOM holds only the page's own scripts."""
    from selenium.webdriver.common.by import By

    for list_id in ("sample-seeds", "sample-list"):
        shown = driver.execute_script(f"return [...document.querySelectorAll('#{list_id} li')].map(e => e.textContent)")
        assert shown, (page, list_id)
        assert all(t.endswith(MARKED_SUFFIX) and t[:-len(MARKED_SUFFIX)] in titles for t in shown), (page, shown)
    visible = driver.find_element(By.ID, "sample").text
    assert SCRIPT_TITLE in visible and IMG_TAG in visible, (page, visible)
    assert driver.execute_script("return typeof window.__pwned;") == "undefined", page
    assert driver.execute_script(SCRIPTS_JS) == OWN_SCRIPTS[page], page
    assert driver.execute_script("return document.querySelectorAll('img, iframe, object, embed').length;") == 0, page


def save_screenshot(driver, name: str) -> None:
    """The whole page, below the window too (the sample panel), as artifacts/NAME (Chromium's DevTools)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
        "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    (ARTIFACTS / name).write_bytes(base64.b64decode(shot["data"]))


@pytest.mark.slow
def test_live_page_follows_a_real_run(most_run, browser):
    """A real 10-step `h2po train` on a catalog whose titles hold markup (`write_marked_catalog`): the printed URL
    serves the page, every chart gets data, the step shown changes while the run goes, the sampled titles show as
    text with their markup not run, and the run ends with report.html, which shows them so too (screenshots of both
    go to artifacts/)."""
    run, titles = most_run[0], set(most_run[1])
    ARTIFACTS.mkdir(exist_ok=True)
    proc, lines = start_training(run, steps=10)
    try:
        url = wait_for(browser, lambda d: next((x.split("dashboard: ", 1)[1].strip() for x in list(lines)
                                                if x.startswith("dashboard: ")), None) or proc.poll() is not None,
                       120, "the dashboard URL")
        assert isinstance(url, str), "".join(lines)[-3000:]
        assert url.startswith("http://127.0.0.1:")
        browser.get(url)
        wait_for(browser, lambda d: int(text_of(d, "latest-step") or 0) >= 1, 90, "the first step on the page")
        first = text_of(browser, "latest-step")
        step, status = wait_for(browser, lambda d: text_of(d, "latest-step") != first and (
            text_of(d, "latest-step"), text_of(d, "status")), 60, f"the step to move on from {first}")
        assert int(step) > int(first) and status == "running", (first, step, status)
        wait_for(browser, lambda d: not d.execute_script(EMPTY_CHARTS_JS), 30, "data in every chart")
        assert_titles_shown_as_text(browser, titles, "live")
        save_screenshot(browser, "dashboard.png")
        assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    records, _ = read_records(run)
    assert records[-1]["kind"] == "end" and records[-1]["status"] == "done"
    assert max(r["step"] for r in records if r["kind"] == "step") == 10
    assert all(t.endswith(MARKED_SUFFIX) for r in records if r["kind"] == "sample" for t in r["seeds"] + r["list"])
    browser.get((run / "report.html").as_uri())
    wait_for(browser, lambda d: not d.execute_script(EMPTY_CHARTS_JS), 30, "data in every chart of the report")
    assert text_of(browser, "latest-step") == "10" and text_of(browser, "status") == "done"
    assert_titles_shown_as_text(browser, titles, "report")
    save_screenshot(browser, "report.png")
