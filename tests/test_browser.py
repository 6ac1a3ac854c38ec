"""What a real browser sees: EventSource in headless Chromium on a page of another
origin, and the admin status page. Needs Debian's chromium and chromium-driver
(.ci/run installs them); skipped where they are missing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.web.server import Site
from twisted.web.static import Data

from conftest import running

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless Chromium tests need Debian's chromium and chromium-driver",
)

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>waiting</title></head>
<body><pre id="out"></pre><script>
const base = new URLSearchParams(location.search).get("base");
const got = {details: [], eps: []};
const details = new EventSource(base + "/subscribe/details/X");
details.onmessage = (e) => got.details.push(["message", e.data]);
details.addEventListener("stream.tweet_updates.X", (e) => {
  got.details.push([e.type, e.data, e.lastEventId]);
});
const eps = new EventSource(base + "/subscribe/eps");
eps.onmessage = (e) => got.eps.push(JSON.parse(e.data));
let opened = 0;
for (const es of [details, eps]) es.onopen = () => {
  if (++opened === 2) document.title = "open";
};
window.finish = () => {
  details.close(); eps.close();
  document.getElementById("out").textContent = JSON.stringify(got);
};
</script></body></html>"""


def headless_chromium(*extra: str) -> Iterator[object]:
    """Debian's Chromium driven by its chromedriver, headless; quit at the end."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", *extra):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    # The console, for driver.get_log("browser") (see console_errors).
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """The page's console errors since the last call (uncaught exceptions, failed
    loads such as a 404 for /favicon.ico), as Chromium logged them."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


@pytest.fixture
def browser() -> Iterator[object]:
    yield from headless_chromium()


def wait_until(driver, predicate, seconds: float = 20):
    """Selenium waits block: run them off the reactor thread, which serves the daemon."""
    from selenium.webdriver.support.ui import WebDriverWait

    return threads.deferToThread(WebDriverWait(driver, seconds, 0.05).until, predicate)


@pytest_twisted.ensureDeferred
async def test_eventsource_in_chromium_across_origins(browser, redis_server, publisher):
    resource = Data(PAGE.encode(), "text/html; charset=utf-8")
    resource.isLeaf = True
    page = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    try:
        async with running({"REDIS_URL": redis_server.url}) as (d, _c):
            # The page is on another origin (port): every read needs the CORS header.
            url = f"http://127.0.0.1:{page.getHost().port}/?base=http://127.0.0.1:{d.port}"
            await threads.deferToThread(browser.get, url)
            await wait_until(browser, lambda drv: drv.title == "open")
            payloads = ['{"id":"1","text":"hi"}', "two\nlines\r\nand\rmore", "", " spaced"]
            for p in payloads:
                await publisher.publish("stream.tweet_updates.X", p)
            await publisher.publish("stream.tweet_updates.Y", "not for this page")
            for emoji_id in ("2665", "2665", "1F602"):
                await publisher.publish("stream.score_updates", emoji_id)
            await wait_until(browser, lambda drv: drv.execute_script(
                "return got.details.length >= 4 && got.eps.reduce((n, s) => n + "
                "Object.values(s).reduce((a, b) => a + b, 0), 0) >= 3"))
            await threads.deferToThread(browser.execute_script, "finish()")
            got = json.loads(browser.find_element("id", "out").text)
    finally:
        await page.stopListening()
    assert got["details"] == [
        ["stream.tweet_updates.X", '{"id":"1","text":"hi"}', ""],
        ["stream.tweet_updates.X", "two\nlines\nand\nmore", ""],
        ["stream.tweet_updates.X", "", ""],
        ["stream.tweet_updates.X", " spaced", ""],
    ]
    total: dict[str, int] = {}
    for summary in got["eps"]:
        for k, v in summary.items():
            total[k] = total.get(k, 0) + v
    assert total == {"2665": 2, "1F602": 1}


@pytest_twisted.ensureDeferred
async def test_admin_page_shows_the_status_with_a_token(browser, redis_server):
    token = "browser-token-0123456789"
    async with running({"REDIS_URL": redis_server.url, "ADMIN_TOKEN": token,
                        "NODE_NAME": "page.1"}) as (d, c):
        await c.stream("/subscribe/details/2665", headers={"User-Agent": "agent-in-table"})
        await threads.deferToThread(browser.get, f"http://127.0.0.1:{d.port}/admin/")
        await wait_until(browser, lambda drv: "unreachable" in
                         drv.find_element("id", "status").text)
        await threads.deferToThread(
            browser.get, f"http://127.0.0.1:{d.port}/admin/#token={token}")
        await threads.deferToThread(browser.refresh)
        await wait_until(browser, lambda drv: drv.find_element("id", "status").text == "OK")
        assert browser.find_element("id", "node").text == "twisted-development-page.1"
        rows = browser.find_element("id", "connections").text
        assert "/subscribe/details/2665" in rows and "agent-in-table" in rows


PREFLIGHT_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>waiting</title>
</head><body><script>
const q = new URLSearchParams(location.search);
const base = q.get("base");
async function run() {
  const out = {};
  try {
    const cleanup = await fetch(base + "/subscribe/cleanup/details/2665", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"});
    out.cleanup = [cleanup.status, await cleanup.json()];
  } catch (e) { out.cleanup = String(e); }
  try {
    const status = await fetch(base + "/admin/status.json", {
      headers: {"Authorization": "Bearer " + q.get("token")}});
    out.status = [status.status, (await status.json()).node];
  } catch (e) { out.status = String(e); }
  window.result = out;
  document.title = "done";
}
run();
</script></body></html>"""


@pytest_twisted.ensureDeferred
async def test_a_page_on_another_origin_posts_json_and_sends_a_bearer_token(
        browser, redis_server):
    """Both requests need a CORS preflight, which the browser sends first."""
    token = "browser-token-0123456789"
    resource = Data(PREFLIGHT_PAGE.encode(), "text/html; charset=utf-8")
    resource.isLeaf = True
    page = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    try:
        async with running({"REDIS_URL": redis_server.url, "ADMIN_TOKEN": token,
                            "NODE_NAME": "cors.1"}) as (d, c):
            await c.stream("/subscribe/details/2665")
            url = (f"http://127.0.0.1:{page.getHost().port}/"
                   f"?base=http://127.0.0.1:{d.port}&token={token}")
            await threads.deferToThread(browser.get, url)
            await wait_until(browser, lambda drv: drv.title == "done")
            result = browser.execute_script("return window.result")
    finally:
        await page.stopListening()
    assert result["cleanup"] == [200, {"status": "OK", "closed": 1}]
    assert result["status"] == [200, "twisted-development-cors.1"]
