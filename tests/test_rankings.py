"""GET /api/rankings, the all-time ranking the demo page starts from: served with the
demo page only, one Redis read per cache period however many requests, a bounded
limit, 503 with a one-line JSON reason while Redis is down.

The route tests run the daemon in-process against a real redis-server, with a Clock
for its time, and count the reads Redis itself saw (INFO commandstats)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
import txredisapi
from twisted.application.internet import TimerService
from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock

from conftest import running
from emojistream.cache import CACHE_SECONDS
from emojistream.config import RedisAddress
from emojistream.demo import Feeder, load_rankings
from emojistream.rankings import MAX_LIMIT, encode_entries, parse_limit
from redisproc import RedisProcess
from sseclient import within


def until(predicate: Callable[[], bool], seconds: float = 20) -> Deferred[None]:
    """Fires once C{predicate()} holds, checked every 50 ms of real time."""
    loop = task.LoopingCall(lambda: predicate() and loop.stop())
    return within(loop.start(0.05).addCallback(lambda _: None), seconds)


async def redis_calls(conn: Any, command: str) -> int:
    """How many times Redis has run C{command} since it started (INFO commandstats)."""
    info = await within(conn.execute_command("INFO", "commandstats"))
    text = info.decode() if isinstance(info, bytes) else str(info)
    found = re.search(rf"^cmdstat_{command}:calls=(\d+)", text, re.MULTILINE)
    return int(found.group(1)) if found else 0


SEEDED = [("1F602", 900), ("2665", 700), ("ZZZ", 500), ("1F1FA-1F1F8", 300), ("2764", 100)]


async def seed(conn: Any) -> None:
    for emoji_id, score in SEEDED:
        await within(conn.execute_command("ZADD", "emojitrack_score", score, emoji_id))


@pytest_twisted.ensureDeferred
async def test_requests_within_a_cache_period_cost_one_redis_read(
        redis_server: RedisProcess, publisher: Any) -> None:
    await seed(publisher)
    clock = Clock()
    clock.advance(1_800_000_000)
    env = {"REDIS_URL": redis_server.url, "DEMO_PAGE": "yes"}
    async with running(env, clock=clock) as (d, client):
        assert d.app.rankings is not None
        await within(d.app.rankings.connection.when_up())
        before = await redis_calls(publisher, "zrevrange")
        # Many at once, then more one after another, then other limits: one period.
        answers = await within(gatherResults([
            Deferred.fromCoroutine(client.text("GET", "/api/rankings")) for _ in range(30)]))
        answers += [await client.text("GET", "/api/rankings") for _ in range(10)]
        response, body = answers[0]
        assert response.code == 200
        assert response.headers.getRawHeaders("access-control-allow-origin") == ["*"]
        assert response.headers.getRawHeaders("content-type") == ["application/json"]
        assert all(r.code == 200 and b == body for r, b in answers)
        ranking = json.loads(body)
        assert [(e["id"], e["score"]) for e in ranking] == SEEDED
        # Shaped like emojitracker's /v1/rankings; names where this daemon knows them.
        assert ranking[0] == {"char": "😂", "id": "1F602", "name": "FACE WITH TEARS OF JOY",
                              "score": 900}
        assert ranking[2] == {"char": None, "id": "ZZZ", "name": None, "score": 500}
        for limit in (1, 3, MAX_LIMIT):
            response, body = await client.text("GET", f"/api/rankings?limit={limit}")
            assert [e["id"] for e in json.loads(body)] == [i for i, _ in SEEDED][:limit]
        assert await redis_calls(publisher, "zrevrange") == before + 1
        assert d.app.rankings.reads == 1

        # A new period: one more read, which sees what changed meanwhile.
        await within(publisher.execute_command("ZINCRBY", "emojitrack_score", 1000, "2764"))
        _, stale = await client.text("GET", "/api/rankings?limit=1")
        assert json.loads(stale)[0]["id"] == "1F602"  # still the period's answer
        clock.advance(CACHE_SECONDS)
        answers = await within(gatherResults([
            Deferred.fromCoroutine(client.text("GET", "/api/rankings?limit=1"))
            for _ in range(10)]))
        assert {json.loads(b)[0]["id"] for _, b in answers} == {"2764"}
        assert await redis_calls(publisher, "zrevrange") == before + 2


@pytest_twisted.ensureDeferred
async def test_a_limit_out_of_bounds_is_a_400_and_reads_nothing(
        redis_server: RedisProcess, publisher: Any) -> None:
    env = {"REDIS_URL": redis_server.url, "DEMO_PAGE": "yes"}
    async with running(env, clock=Clock()) as (d, client):
        assert d.app.rankings is not None
        await within(d.app.rankings.connection.when_up())
        before = await redis_calls(publisher, "zrevrange")
        for bad in ("0", "-1", "1001", "99999999999999999999", "1.5", "abc", "", "%201",
                    "1e3", "+5"):
            response, body = await client.text("GET", f"/api/rankings?limit={bad}")
            assert response.code == 400, bad
            assert json.loads(body) == {"error": "limit is a whole number from 1 to 1000"}
            assert body.count(b"\n") == 0
        assert await redis_calls(publisher, "zrevrange") == before


@pytest_twisted.ensureDeferred
async def test_503_with_a_json_reason_while_redis_is_down_then_answers_again(
        redis_server: RedisProcess) -> None:
    clock = Clock()
    env = {"REDIS_URL": redis_server.url, "DEMO_PAGE": "yes"}
    async with running(env, clock=clock, subscribed=False) as (d, client):
        rankings = d.app.rankings
        assert rankings is not None
        await within(rankings.connection.when_up())
        response, body = await client.text("GET", "/api/rankings")
        assert response.code == 200 and json.loads(body) == []

        redis_server.stop()
        await until(lambda: rankings.connection.protocol is None)
        clock.advance(CACHE_SECONDS)
        response, body = await client.text("GET", "/api/rankings?limit=5")
        assert response.code == 503
        assert response.headers.getRawHeaders("retry-after") == ["1"]
        assert response.headers.getRawHeaders("access-control-allow-origin") == ["*"]
        reason = json.loads(body)
        assert set(reason) == {"error"} and "Redis is" in reason["error"]
        assert b"\n" not in body.strip()

        redis_server.start()
        await within(rankings.connection.when_up(), 20)
        conn = await within(txredisapi.Connection(
            "127.0.0.1", redis_server.port, reconnect=False, convertNumbers=False,
            charset=None))
        try:
            await within(conn.execute_command("ZADD", "emojitrack_score", 7, "2665"))
        finally:
            await conn.disconnect()
        response, body = await client.text("GET", "/api/rankings")
        assert response.code == 200
        assert [(e["id"], e["score"]) for e in json.loads(body)] == [("2665", 7)]


@pytest_twisted.ensureDeferred
async def test_not_served_without_the_demo_page(redis_server: RedisProcess) -> None:
    async with running({"REDIS_URL": redis_server.url}) as (d, client):
        assert d.app.rankings is None  # and no connection of its own to Redis
        response, body = await client.text("GET", "/api/rankings")
        assert response.code == 404 and body == b"404 Not Found\n"


# -- pure logic (fast tier) ------------------------------------------------------


def test_limit_bounds() -> None:
    assert parse_limit(None) == MAX_LIMIT
    assert [parse_limit(v) for v in (b"1", b"10", b"1000", b"0007")] == [1, 10, 1000, 7]
    for bad in (b"0", b"1001", b"-3", b"", b" 5", b"5 ", b"1.0", b"\xd9\xa3", b"00001"):
        try:
            parse_limit(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")


def test_entries_skip_what_no_stream_could_carry() -> None:
    reply = [b"1F602", b"12.0", b"bad id!", b"11", b"X", b"inf", b"\xff", b"9", b"2665",
             b"3", b"nan", b"nan", b"A" * 65, b"2", b"ZZZ", b"1"]
    entries = [json.loads(e) for e in encode_entries(reply, {"1F602": ("😂", "JOY")})]
    assert entries == [
        {"char": "😂", "id": "1F602", "name": "JOY", "score": 12},
        {"char": None, "id": "2665", "name": None, "score": 3},
        {"char": None, "id": "ZZZ", "name": None, "score": 1},
    ]


# -- the demo feeder keeps the all-time scores -------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_demo_feeder_counts_every_hit_in_the_all_time_scores(
        redis_server: RedisProcess, publisher: Any) -> None:
    async with running({"REDIS_URL": redis_server.url}, {"demo": "true"}) as (d, client):
        feeder = d.app.feeder
        assert feeder is not None
        await until(lambda: feeder.published >= 200)
        # Stop publishing; once Redis answers a PING on the feeder's connection, every
        # command the feeder sent before it has run.
        (timer,) = [s for s in feeder if isinstance(s, TimerService)]
        await timer.stopService()
        await within(feeder._connection.protocol.execute_command("PING"))
        hits = feeder.published
        assert await redis_calls(publisher, "zincrby") == hits
        assert await redis_calls(publisher, "publish") == 2 * hits
        reply = await within(publisher.execute_command(
            "ZREVRANGE", "emojitrack_score", 0, -1, "WITHSCORES"))
        scores = {m.decode(): int(s) for m, s in zip(reply[::2], reply[1::2], strict=True)}
        assert sum(scores.values()) == hits
        assert set(scores) <= {e.id for e in load_rankings()}
        # The route serves what the feeder counted, best first.
        _, body = await client.text("GET", "/api/rankings")
        ranking = [(e["id"], e["score"]) for e in json.loads(body)]
        assert dict(ranking) == scores
        assert [s for _, s in ranking] == sorted(scores.values(), reverse=True)


class _Recorder:
    """A Redis protocol that records commands and never answers."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> Deferred[Any]:
        self.sent.append(args)
        return Deferred()

    def publish(self, channel: str, message: Any) -> Deferred[Any]:
        return self.execute_command("PUBLISH", channel, message)


def test_each_hit_is_a_zincrby_and_its_publishes_sent_without_waiting() -> None:
    clock = Clock()
    feeder = Feeder(RedisAddress(host="127.0.0.1", port=1), reactor=clock, rate=100)
    recorder = _Recorder()
    feeder._connection.protocol = recorder
    feeder.tick()
    clock.advance(0.1)
    feeder.tick()  # ten hits owed, none of the replies come
    assert feeder.published == 10 and len(recorder.sent) == 30
    for i in range(0, 30, 3):
        zincrby, score, detail = recorder.sent[i:i + 3]
        emoji_id = zincrby[3]
        assert zincrby == ("ZINCRBY", "emojitrack_score", 1, emoji_id)
        assert score == ("PUBLISH", "stream.score_updates", emoji_id)
        assert detail[:2] == ("PUBLISH", "stream.tweet_updates." + emoji_id)


@pytest.mark.slow  # --demo starts a real redis-server
@pytest_twisted.ensureDeferred
async def test_the_embedded_redis_starts_from_the_shipped_all_time_scores() -> None:
    """--demo on its own Redis: the ranking is emojitracker's from the start, every
    shipped emoji at its all-time score or above (the feeder's hits on top)."""
    async with running({}, {"demo": "true"}) as (d, client):
        assert d.app.embedded_redis is not None
        response, body = await client.text("GET", "/api/rankings")
        assert response.code == 200
        served = {e["id"]: e for e in json.loads(body)}
        shipped = load_rankings()
        assert len(served) == len(shipped)
        for emoji in shipped:
            entry = served[emoji.id]
            assert (entry["char"], entry["name"]) == (emoji.char, emoji.name)
            assert entry["score"] >= emoji.score
        assert next(iter(served)) == shipped[0].id
