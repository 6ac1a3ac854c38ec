"""Fixtures: a real Redis per test, the daemon in-process on a real port, a real client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

# Hypothesis loads every installed plugin when it is imported; trio's (selenium's
# dependency) runs `ldconfig -p` then: a process started by the fast tier. None is used.
os.environ.setdefault("HYPOTHESIS_NO_PLUGINS", "1")

import pytest
import pytest_twisted
import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import gatherResults

sys.path.insert(0, str(Path(__file__).parent))
# As twistd runs it (PYTHONPATH, see repo_env): Twisted finds this checkout's plugins
# (twisted/plugins: the twistd plugin, the reuseport: endpoint) when it first looks.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from emojistream.config import resolve
from emojistream.service import Emojistream
from redisproc import RedisProcess
from sseclient import Client, within

REPO = Path(__file__).resolve().parent.parent
# Else twisted.plugins has its path already, without this checkout's.
assert "twisted.plugins" not in sys.modules, "twisted.plugins was imported before conftest"


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    server = RedisProcess()
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Daemon:
    """A running Emojistream in this process, listening on a loopback port."""

    def __init__(self, app: Emojistream, port: int) -> None:
        self.app = app
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    async def stop(self, wait: bool = True) -> None:
        """Stop the daemon once the server has seen its clients go (so that the drain,
        whose timers may run on a test's Clock, has nothing left to wait for); without
        C{wait} (a test that failed), at once."""
        try:
            if wait:
                await within(gatherResults(
                    [s.writer.when_finished() for s in self.app.hub.streams()]), 5)
        finally:
            # A test that failed may have left connections open: cut them.
            for stream in list(self.app.hub.streams()):
                stream.writer.drop()
            await self.app.service.stopService()


async def start_daemon(env: dict[str, str], options: dict[str, str | None] | None = None,
                       clock: Any = None) -> Daemon:
    """Start the daemon in-process; C{clock} (a Clock) drives its timers if given."""
    opts: dict[str, str | None] = {"listen": "tcp:0:interface=127.0.0.1"}
    opts.update(options or {})
    # A short drain keeps each test's stop quick; tests of the drain set their own.
    env = {"SSE_DRAIN_SEC": "0.05", **env}
    app = Emojistream(resolve(env, opts), reactor, clock)
    app.service.startService()
    port = await within(app.when_listening())
    return Daemon(app, port.getHost().port)


@asynccontextmanager
async def running(env: dict[str, str], options: dict[str, str | None] | None = None,
                  clock: Any = None, subscribed: bool = True
                  ) -> AsyncIterator[tuple[Daemon, Client]]:
    """A daemon started for one test (subscribed to Redis unless told otherwise) and a
    client for it; both closed and stopped at the end, also on failure."""
    d = await start_daemon(env, options, clock)
    c = Client(d.base)
    failed = True
    try:
        if subscribed:
            await within(d.app.feed.when_subscribed())
            # Its command connection too: its "is up" line comes no later.
            await within(d.app.commands.when_up())
        yield d, c
        failed = False
    finally:
        await c.close()
        # After a failure its streams may be open still: no waiting that would hide it.
        await d.stop(wait=not failed)


@pytest.fixture
def daemon_env(redis_server: RedisProcess) -> dict[str, str]:
    """Environment for the daemon under test (tests may add to it before starting)."""
    return {"REDIS_URL": redis_server.url, "NODE_NAME": "test.1"}


@pytest_twisted.async_yield_fixture
async def daemon(daemon_env: dict[str, str]) -> AsyncIterator[Daemon]:
    d = await start_daemon(daemon_env)
    await within(d.app.feed.when_subscribed())
    # Its command connection too: a test watching the log sees no start-up line late.
    await within(d.app.commands.when_up())
    try:
        yield d
    finally:
        await d.stop()


@pytest_twisted.async_yield_fixture
async def client(daemon: Daemon) -> AsyncIterator[Client]:
    c = Client(daemon.base)
    try:
        yield c
    finally:
        await c.close()


@pytest_twisted.async_yield_fixture
async def publisher(redis_server: RedisProcess) -> AsyncIterator[Any]:
    """A plain Redis client connection for PUBLISHing, like the upstream feeder."""
    conn = await within(txredisapi.Connection(
        "127.0.0.1", redis_server.port, reconnect=False, convertNumbers=False, charset=None
    ))
    try:
        yield conn
    finally:
        await conn.disconnect()


def repo_env() -> dict[str, str]:
    """Environment for a twistd child that runs this checkout's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class LogCapture:
    """Every log event emitted while installed (twisted.logger's global publisher)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def ours(self) -> list[str]:
        """The daemon's own log lines, formatted."""
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events
                if str(e.get("log_namespace", "")).startswith("emojistream")]

    def failures(self) -> list[dict[str, Any]]:
        """Events that carry a traceback (new-style, or logged through twisted.python.log)."""
        return [e for e in self.events if "log_failure" in e or e.get("isError")]


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    from twisted.logger import globalLogPublisher

    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    try:
        yield capture
    finally:
        globalLogPublisher.removeObserver(capture)


#: Fixtures that start real parts: a test using one is in the slow tier.
_SLOW_FIXTURES = {"redis_server", "daemon", "client", "publisher", "daemon_env",
                  "redis_server_with_password", "browser", "h2_browser", "nginx", "workers",
                  "certificate"}
#: Modules whose every test crosses a process boundary (elsewhere a test that does,
#: without one of the fixtures above, is marked slow itself: the fast tier's guard
#: below fails it otherwise).
_SLOW_MODULES = {"test_bench", "test_lint", "test_twistd", "test_systemd", "test_workers",
                 "test_floods", "test_nginx", "test_http2", "test_browser",
                 "test_redis_outage", "test_pages", "test_resume"}


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Mark the slow tier: what starts Redis, processes, a browser, nginx (the fast
    tier, C{pytest -m "not slow"}, drives the daemon in memory)."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in _SLOW_MODULES or _SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


#: How a process starts: subprocess (through its one fork-and-exec step), Twisted's
#: spawnProcess (posix_spawnp or fork), and the rest of os.
_PROCESS_STARTS = ["fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "popen",
                   "spawnv", "spawnve", "spawnvp", "spawnvpe"]
#: What a real socket does to reach anything: a port, a Redis, a path.
_SOCKET_REACHES = ["bind", "connect", "connect_ex", "sendto"]


@pytest.fixture(autouse=True)
def _fast_tier_promise(request: pytest.FixtureRequest,
                       monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The fast tier's promise, kept: a test not marked slow that starts a process or
    binds, connects or sends on a real socket fails, saying so (Clock, MemoryReactor,
    StringTransport and iosim touch none). Also when the call was made in a callback
    that swallowed the failure: checked again at the end."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    broken = request.node.stash.setdefault(_BROKEN, [])

    def refuse(what: str) -> Callable[..., NoReturn]:
        def refused(*args: Any, **kwargs: Any) -> NoReturn:
            broken.append(what)
            pytest.fail(f"{what} in a fast test: the fast tier (-m 'not slow') starts no "
                        "process and opens no real socket; drive it on a Clock, "
                        "MemoryReactor, StringTransport or iosim, or mark the test slow",
                        pytrace=True)
        return refused

    monkeypatch.setattr(subprocess.Popen, "_execute_child",
                        refuse("starting a process (subprocess)"))
    for name in _PROCESS_STARTS:
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse(f"starting a process (os.{name})"))
    for method in _SOCKET_REACHES:
        monkeypatch.setattr(socket.socket, method, refuse(f"a real socket's {method}()"))
    yield


#: What a fast test did that the fast tier promises it does not (see below).
_BROKEN = pytest.StashKey[list[str]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[pytest.TestReport]:
    """A fast test that passed although it was refused a process or a socket (a
    callback swallowed the failure, or the code went on without): failed all the same."""
    report: pytest.TestReport = yield
    broken = item.stash.get(_BROKEN, [])
    if report.when == "call" and report.passed and broken:
        report.outcome = "failed"
        report.longrepr = (f"{', '.join(sorted(set(broken)))} in a fast test (refused, "
                           "but the refusal was swallowed): mark it slow or drive it in memory")
    return report
