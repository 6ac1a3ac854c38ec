"""The pages people look at, in headless Chromium, with screenshots the tests check:
the live demo grid at / and the admin page's cluster view; and a real EventSource
resuming with no loss after the server cut its connection (--event-ids).

Screenshots go to the test's tmp_path (and to $EMOJISTREAM_SCREENSHOTS if set, for a
person or CI to look at); each is checked to be a PNG of the window's size, and a
page that should be moving must look different a moment later."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.server import Site
from twisted.web.static import Data

from conftest import running
from emojistream.reporting import ADMIN_INTERVAL
from redisproc import RedisProcess
from sseclient import within
from test_browser import CHROMEDRIVER, CHROMIUM, console_errors, headless_chromium, wait_until
from test_resume import Feeder

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless Chromium tests need Debian's chromium and chromium-driver",
)

WIDTH, HEIGHT = 1200, 900


@pytest.fixture
def chromium() -> Iterator[Any]:
    # No back/forward cache: a page left keeps no streams open in it.
    yield from headless_chromium(f"--window-size={WIDTH},{HEIGHT}",
                                 "--disable-features=BackForwardCache")


def screenshot(driver: Any, tmp_path: Path, name: str) -> bytes:
    """A screenshot of the whole window, saved and checked to be a PNG of its size."""
    png: bytes = driver.get_screenshot_as_png()
    (tmp_path / f"{name}.png").write_bytes(png)
    keep = os.environ.get("EMOJISTREAM_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / f"{name}.png").write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == tuple(driver.execute_script(
        "return [window.innerWidth * devicePixelRatio, window.innerHeight * devicePixelRatio]"))
    return png


def until(predicate: Callable[[], bool], seconds: float = 20) -> Deferred[None]:
    """Fires once C{predicate()} holds, checked every 50 ms."""
    d: Deferred[None] = Deferred()

    def check() -> None:
        if predicate():
            loop.stop()

    loop = task.LoopingCall(check)
    loop.start(0.05).addCallback(lambda _: d.callback(None))
    return within(d, seconds)


async def leave(driver: Any) -> None:
    """Leave the page, so that its streams end before the daemon stops."""
    await threads.deferToThread(driver.get, "about:blank")


def number(text: str) -> float:
    return float(text.replace(",", "") or 0)


@pytest_twisted.ensureDeferred
async def test_the_demo_grid_ranks_growing_scores_and_shows_tweets_on_a_click(
        chromium: Any, redis_server: RedisProcess, tmp_path: Path) -> None:
    # --demo with a Redis given: its feeder publishes there at 250 hits/s.
    async with running({"REDIS_URL": redis_server.url}, {"demo": "true"}) as (d, _c):
        await threads.deferToThread(chromium.get, f"http://127.0.0.1:{d.port}/")
        await wait_until(chromium, lambda drv: len(drv.find_elements("css selector",
                                                                      ".emoji")) >= 10)
        total = number(chromium.find_element("id", "total").text)
        before = screenshot(chromium, tmp_path, "demo-grid-1")
        await wait_until(chromium, lambda drv: number(drv.find_element("id", "total").text)
                         >= total + 200)
        after = screenshot(chromium, tmp_path, "demo-grid-2")
        assert before != after  # the counts moved on screen
        assert number(chromium.find_element("id", "rate").text) > 0
        # Ranked: in display order, scores never go up.
        ranked = chromium.execute_script("""
            return [...document.querySelectorAll('.emoji')]
              .sort((a, b) => (+a.style.order) - (+b.style.order))
              .map((c) => [c.dataset.id, +c.dataset.score || 0]);""")
        scores = [score for _, score in ranked]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0
        top = ranked[0][0]

        chromium.find_element("id", f"emoji-{top}").click()
        await wait_until(chromium, lambda drv: len(drv.find_elements(
            "css selector", "#tweets li")) >= 3)
        assert top in chromium.find_element("id", "detail-title").text
        tweets = [li.text for li in chromium.find_elements("css selector", "#tweets li")]
        assert all(t.startswith("@") and len(t) > 5 for t in tweets)
        screenshot(chromium, tmp_path, "demo-detail")
        # The page is an ordinary client: one /eps and one detail stream of this ID.
        paths = sorted(s.request_path for s in d.app.hub.streams())
        assert paths == ["/subscribe/details/" + top, "/subscribe/eps"]
        await leave(chromium)


@pytest_twisted.ensureDeferred
async def test_the_admin_page_shows_the_cluster_with_live_rates(
        chromium: Any, redis_server: RedisProcess, tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(1_800_000_000)
    env = {"REDIS_URL": redis_server.url, "ADMIN_REPORT": "true", "NODE_NAME": "admin.1"}
    async with running(env, {"demo": "true"}, clock=clock) as (d, client):
        await client.stream("/subscribe/details/2665", {"User-Agent": "agent-in-table"})
        reporter = d.app.admin_reporter
        assert reporter is not None
        await within(reporter._connection.when_up())

        async def report_after(messages: int) -> None:
            """A report once the daemon has received C{messages} more (real time)."""
            goal = d.app.router.received + messages
            await until(lambda: d.app.router.received >= goal)
            clock.advance(ADMIN_INTERVAL)
            await within(reporter.last_report)

        await report_after(0)
        await report_after(200)
        await threads.deferToThread(chromium.get, f"http://127.0.0.1:{d.port}/admin/")
        row = "#nodes tr[data-node='twisted-development-admin.1']"

        def rate_in(drv: Any) -> float:
            # Read in one script: the table is rebuilt every two seconds.
            text = drv.execute_script(
                "const c = document.querySelector(arguments[0]); return c && c.textContent;",
                row + " .rate-in")
            return number(text or "")

        await wait_until(chromium, lambda drv: rate_in(drv) > 0)
        first_rate = rate_in(chromium)
        assert "1 node(s), 0 stale" in chromium.find_element("id", "cluster-summary").text
        assert "agent-in-table" in chromium.find_element("id", "connections").text
        before = screenshot(chromium, tmp_path, "admin-cluster-1")
        # A report over a stretch with three times the messages: another rate.
        await report_after(600)
        await wait_until(chromium, lambda drv: rate_in(drv) not in (0.0, first_rate))
        after = screenshot(chromium, tmp_path, "admin-cluster-2")
        assert before != after
        await leave(chromium)


RESUME_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>waiting</title>
</head><body><script>
const base = new URLSearchParams(location.search).get("base");
window.seen = []; window.opens = 0; window.ids = [];
const es = new EventSource(base + "/subscribe/details/2665");
es.onopen = () => { window.opens += 1; document.title = "open " + window.opens; };
es.addEventListener("stream.tweet_updates.2665", (e) => {
  window.seen.push(JSON.parse(e.data).n); window.ids.push(e.lastEventId);
});
es.addEventListener("gap", () => { window.gap = true; });
</script></body></html>"""


@pytest_twisted.ensureDeferred
async def test_an_eventsource_whose_connection_the_server_cuts_resumes_with_no_loss(
        chromium: Any, redis_server: RedisProcess, publisher: Any) -> None:
    resource = Data(RESUME_PAGE.encode(), "text/html; charset=utf-8")
    resource.isLeaf = True
    page = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    # Forced-refresh mode's retry hint brings the browser back in 200 ms, not 3 s.
    env = {"REDIS_URL": redis_server.url, "SSE_EVENT_IDS": "1", "SSE_FORCE_REFRESH": "1",
           "SSE_DETAIL_RETRY_MS": "200"}
    try:
        async with running(env) as (d, _c):
            url = f"http://127.0.0.1:{page.getHost().port}/?base=http://127.0.0.1:{d.port}"
            await threads.deferToThread(chromium.get, url)
            await wait_until(chromium, lambda drv: drv.title == "open 1")
            feeder = Feeder(publisher)
            feeder.start()
            try:
                await wait_until(chromium, lambda drv: len(drv.execute_script(
                    "return window.seen")) >= 30)
                for stream in d.app.hub.in_namespace("/details/2665"):
                    stream.writer.drop()  # the server cuts the connection, mid-stream
                cut = len(feeder.details["2665"])
                await wait_until(chromium, lambda drv: drv.title == "open 2")
                await wait_until(chromium, lambda drv: len(drv.execute_script(
                    "return window.seen")) >= cut + 30)
            finally:
                await feeder.stop()
            published = feeder.details["2665"]
            await wait_until(chromium, lambda drv: len(drv.execute_script(
                "return window.seen")) >= len(published))
            seen = chromium.execute_script("return window.seen")
            assert seen == published  # every one, once, in order, across the cut
            assert chromium.execute_script("return window.gap") is None
            ids = chromium.execute_script("return window.ids")
            assert len(set(ids)) == len(ids) and json.dumps(ids)
            await leave(chromium)
    finally:
        await page.stopListening()


async def published(publisher: Any, *ids: str) -> None:
    for emoji_id in ids:
        await publisher.publish("stream.score_updates", emoji_id)


def hits(driver: Any) -> float:
    return number(driver.find_element("id", "total").text)


def grid(driver: Any) -> list[tuple[str, int, str]]:
    """The cells in display order: (ID, score, what the cell shows)."""
    cells: list[list[Any]] = driver.execute_script("""
        return [...document.querySelectorAll('.emoji')]
          .sort((a, b) => (+a.style.order) - (+b.style.order))
          .map((c) => [c.dataset.id, +c.dataset.score || 0,
                       c.querySelector('.char').textContent]);""")
    return [(i, s, t) for i, s, t in cells]


@pytest_twisted.ensureDeferred
async def test_every_id_gets_a_cell_and_the_page_keeps_counting(
        chromium: Any, redis_server: RedisProcess, publisher: Any, tmp_path: Path) -> None:
    """Any ID of letters, digits, '-' and '_' reaches the page: one that is not hex
    code points (or not valid ones) is shown as text, and nothing stops the grid."""
    env = {"REDIS_URL": redis_server.url, "DEMO_PAGE": "yes"}
    async with running(env) as (d, _c):
        await threads.deferToThread(chromium.get, f"http://127.0.0.1:{d.port}/")
        await wait_until(chromium, lambda drv: drv.find_element("id", "state").text == "live")
        await published(publisher, "2665", "2665", "2665")
        await wait_until(chromium, lambda drv: hits(drv) == 3)
        odd = ["ZZZ", "D800", "110000", "FFFFFFFFFF", "1F1FA-1F1F8", "0023-20E3", "a_b-c",
               "1F602--1F602", "-"]
        await published(publisher, *odd)
        await published(publisher, *["1F602"] * 20)
        # The counter goes on: every hit is counted, those of the odd IDs too.
        await wait_until(chromium, lambda drv: hits(drv) == 3 + len(odd) + 20)
        await published(publisher, "2665")
        await wait_until(chromium, lambda drv: hits(drv) == 4 + len(odd) + 20)
        shown = {emoji_id: text for emoji_id, _, text in grid(chromium)}
        assert shown == {
            "2665": "\u2665\ufe0f", "1F602": "😂", "1F1FA-1F1F8": "🇺🇸",
            "0023-20E3": "#\ufe0f\u20e3", "ZZZ": "ZZZ", "D800": "D800", "110000": "110000",
            "FFFFFFFFFF": "FFFFFFFFFF", "a_b-c": "a_b-c", "1F602--1F602": "1F602--1F602",
            "-": "-"}
        assert grid(chromium)[:2] == [("1F602", 20, "😂"), ("2665", 4, "\u2665\ufe0f")]
        screenshot(chromium, tmp_path, "demo-odd-ids")
        # A click on a text cell opens its details like any other.
        chromium.find_element("id", "emoji-ZZZ").click()
        await wait_until(chromium, lambda drv: drv.find_element("id", "detail-title").text
                         == "ZZZ")
        await until(lambda: any(s.request_path == "/subscribe/details/ZZZ"
                                for s in d.app.hub.streams()))
        assert console_errors(chromium) == []
        await leave(chromium)


@pytest_twisted.ensureDeferred
async def test_the_pages_load_without_console_errors(
        chromium: Any, redis_server: RedisProcess) -> None:
    """No error on the console as either page loads in demo mode: no 404 for
    /favicon.ico. (Without --admin-report the admin page's cluster.json is a 404.)"""
    async with running({"REDIS_URL": redis_server.url}, {"demo": "true"}) as (d, _c):
        await threads.deferToThread(chromium.get, f"http://127.0.0.1:{d.port}/")
        await wait_until(chromium, lambda drv: drv.find_element("id", "state").text == "live"
                         and drv.execute_script("return document.readyState") == "complete")
        home = console_errors(chromium)
        await threads.deferToThread(chromium.get, f"http://127.0.0.1:{d.port}/admin/")
        await wait_until(chromium, lambda drv: drv.find_element("id", "status").text == "OK"
                         and drv.execute_script("return document.readyState") == "complete")
        admin = console_errors(chromium)
        await leave(chromium)
        assert (home, admin) == ([], [])


@pytest_twisted.ensureDeferred
async def test_the_grid_starts_from_the_all_time_ranking_then_adds_the_hits(
        chromium: Any, redis_server: RedisProcess, publisher: Any, tmp_path: Path) -> None:
    """As emojitracker's page: the all-time scores (emojitrack_score) first, ranked,
    before any hit arrives; then /eps on top of them."""
    seeded = [("1F602", 5000), ("2764", 3000), ("ZZZ", 1000), ("1F1FA-1F1F8", 400),
              ("2665", 250)]
    for emoji_id, score in seeded:
        await within(publisher.execute_command("ZADD", "emojitrack_score", score, emoji_id))
    env = {"REDIS_URL": redis_server.url, "DEMO_PAGE": "yes"}
    async with running(env) as (d, _c):
        await threads.deferToThread(chromium.get, f"http://127.0.0.1:{d.port}/")
        await wait_until(chromium, lambda drv: [s for _, s, _ in grid(drv)]
                         == [s for _, s in seeded])
        assert [(i, s) for i, s, _ in grid(chromium)] == seeded
        assert hits(chromium) == 0
        screenshot(chromium, tmp_path, "demo-all-time")
        await wait_until(chromium, lambda drv: drv.find_element("id", "state").text == "live")
        await published(publisher, *["2665"] * 3000, "1F602")
        await wait_until(chromium, lambda drv: hits(drv) == 3001)
        await wait_until(chromium, lambda drv: [(i, s) for i, s, _ in grid(drv)] == [
            ("1F602", 5001), ("2665", 3250), ("2764", 3000), ("ZZZ", 1000),
            ("1F1FA-1F1F8", 400)])
        assert console_errors(chromium) == []
        await leave(chromium)
