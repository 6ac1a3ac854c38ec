"""Readiness on a Redis replica: a replica whose link to its primary is down takes
the subscription and delivers nothing, so the node must say it is not ready."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher

from conftest import running
from emojistream.redisfeed import (
    REPLICA_CHECK,
    REPLICA_UNLINKED,
    VERDICT_CHECKS,
    ReplicaWatch,
    parse_info,
    replica_unlinked,
)
from redisproc import RedisProcess
from sseclient import within

#: INFO replication as redis-server 6.2 answers it on a replica whose primary left.
UNLINKED_INFO = (b"# Replication\r\nrole:slave\r\nmaster_host:127.0.0.1\r\n"
                 b"master_port:6390\r\nmaster_link_status:down\r\n"
                 b"master_last_io_seconds_ago:-1\r\nmaster_sync_in_progress:0\r\n"
                 b"slave_repl_offset:1\r\nmaster_link_down_since_seconds:4\r\n"
                 b"slave_priority:100\r\nslave_read_only:1\r\nconnected_slaves:0\r\n")
LINKED_INFO = UNLINKED_INFO.replace(b"master_link_status:down", b"master_link_status:up")
PRIMARY_INFO = (b"# Replication\r\nrole:master\r\nconnected_slaves:1\r\n"
                b"slave0:ip=127.0.0.1,port=6391,state=online,offset=14,lag=0\r\n")


def test_info_is_read_field_by_field():
    info = parse_info(UNLINKED_INFO)
    assert info["role"] == "slave" and info["master_link_status"] == "down"
    assert info["master_port"] == "6390" and "# Replication" not in info
    # A value may hold colons and commas of its own.
    assert parse_info(PRIMARY_INFO)["slave0"] == (
        "ip=127.0.0.1,port=6391,state=online,offset=14,lag=0")


@pytest.mark.parametrize(("info", "unlinked"), [
    (UNLINKED_INFO, True),
    (LINKED_INFO, False),
    (PRIMARY_INFO, False),
    # Still loading its first copy from the primary: nothing arrives yet either.
    (UNLINKED_INFO.replace(b"master_sync_in_progress:0", b"master_sync_in_progress:1"), True),
    (b"", False),  # nothing said: no verdict against it
])
def test_only_a_replica_without_its_primary_is_unlinked(info: bytes, unlinked: bool):
    assert replica_unlinked(parse_info(info)) is unlinked


class FakeFeed:
    state = "up"


class FakeCommands:
    """A command connection whose INFO answers are set by the test."""

    description = "Redis command connection to redis://test"

    def __init__(self) -> None:
        self.protocol: Any = self
        self.answer: Any = LINKED_INFO
        self.asked = 0

    def execute_command(self, *command: str) -> Deferred[Any]:
        assert command == ("INFO", "replication")
        self.asked += 1
        answer = self.answer
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)


def watched() -> tuple[ReplicaWatch, FakeFeed, FakeCommands, Clock]:
    feed, commands, clock = FakeFeed(), FakeCommands(), Clock()
    return ReplicaWatch(feed, commands, clock=clock), feed, commands, clock


def test_a_replica_without_its_primary_is_not_up_until_it_is_linked_again():
    watch, feed, commands, clock = watched()
    assert watch.state == "up"  # no answer yet: the subscription alone decides
    commands.answer = UNLINKED_INFO
    watch.check()
    assert watch.state == REPLICA_UNLINKED
    feed.state = "down"
    assert watch.state == "down"  # not subscribed says more
    feed.state = "up"
    clock.advance(REPLICA_CHECK)
    commands.answer = LINKED_INFO
    watch.check()
    assert watch.state == "up"


def test_a_verdict_without_fresh_answers_ages_out():
    watch, _feed, commands, clock = watched()
    commands.answer = UNLINKED_INFO
    watch.check()
    commands.protocol = None  # the command connection is down: nothing asked
    clock.advance(VERDICT_CHECKS * REPLICA_CHECK)
    assert watch.check() is None and watch.state == REPLICA_UNLINKED
    clock.advance(0.1)
    assert watch.state == "up"


def test_one_question_at_a_time_and_a_lost_answer_keeps_the_verdict():
    watch, _feed, commands, _clock = watched()
    commands.answer = UNLINKED_INFO
    watch.check()
    commands.answer = Deferred()
    pending = watch.check()
    assert watch.check() is None and commands.asked == 2
    commands.answer.errback(txredisapi.ConnectionError("Lost connection"))
    assert pending is not None and pending.called
    assert watch.state == REPLICA_UNLINKED


def test_info_refused_leaves_readiness_to_the_subscription_with_one_line(
        log_lines: list[str]):
    watch, _feed, commands, _clock = watched()
    commands.answer = UNLINKED_INFO
    watch.check()
    commands.answer = txredisapi.ResponseError("NOPERM this user has no permissions")
    watch.check()
    watch.check()
    assert watch.state == "up"
    refused = [line for line in log_lines if "Cannot check Redis replication" in line]
    assert len(refused) == 1 and "NOPERM" in refused[0]


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    from twisted.logger import formatEvent

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


@pytest.fixture
def primary_and_replica(tmp_path: Path) -> Iterator[tuple[RedisProcess, RedisProcess]]:
    primary = RedisProcess(extra_args=("--dir", str(tmp_path / "primary")))
    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()
    replica = RedisProcess(extra_args=("--dir", str(tmp_path / "replica"),
                                       "--replicaof", "127.0.0.1", str(primary.port)))
    try:
        primary.start()
        replica.start()
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


async def link_status(replica: Any, wanted: bytes) -> None:
    """Wait until the replica itself reports its link as C{wanted} (Redis connects
    to its primary from a once-a-second cron: there is no event to wait on)."""
    for _ in range(150):
        info = await within(replica.execute_command("INFO", "replication"))
        if f"master_link_status:{wanted.decode()}".encode() in info:
            return
        await deferLater(reactor, 0.1)
    raise AssertionError(f"the replica's link never went {wanted!r}: {info!r}")


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_ready_follows_the_replica_s_link_to_its_primary(primary_and_replica):
    primary, replica = primary_and_replica
    clock = Clock()
    replica_client = await within(txredisapi.Connection(
        "127.0.0.1", replica.port, reconnect=False, convertNumbers=False, charset=None))
    try:
        await link_status(replica_client, b"up")
        async with running({"REDIS_URL": replica.url}, clock=clock) as (d, client):
            app = d.app
            await within(app.commands.when_up())

            async def checked() -> tuple[int, dict[str, Any]]:
                # One check interval on the daemon's clock: the timer asks Redis.
                clock.advance(REPLICA_CHECK)
                assert app.redis.last_check is not None
                await within(app.redis.last_check)
                response, _ = await client.text("GET", "/health/ready")
                _, body = await client.text("GET", "/admin/status.json")
                return response.code, json.loads(body)

            code, status = await checked()
            assert (code, status["status"], status["redis"]) == (200, "OK", "up")

            primary.stop()
            await link_status(replica_client, b"down")
            code, status = await checked()
            assert code == 503
            assert (status["status"], status["redis"]) == (
                "REDIS_REPLICA_UNLINKED", "replica_unlinked")
            assert app.summary() == "0 streams, Redis replica_unlinked"
            assert app.feed.state == "up"  # subscribed all along

            primary.start()
            await link_status(replica_client, b"up")
            code, status = await checked()
            assert (code, status["status"]) == (200, "OK")

            # A replica pointed at a primary that is not there at all.
            await within(replica_client.execute_command(
                "REPLICAOF", "127.0.0.1", str(RedisProcess().port)))
            code, _ = await checked()
            assert code == 503
            await within(replica_client.execute_command("REPLICAOF", "NO", "ONE"))
            code, _ = await checked()
            assert code == 200  # a primary now
    finally:
        await replica_client.disconnect()
