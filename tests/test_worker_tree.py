"""The --workers tree as operators meet it: real twistd parents and workers, a real
Redis, a real NOTIFY_SOCKET whose every datagram says which process sent it, and every
process of the tree killed, stopped and signalled with 200 streams open."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemonproc import TwistdProcess
from emojistream.demo import free_port
from manyclients import ManyStreams, RawStream

pytestmark = pytest.mark.slow

STREAMS = 200


class NotifySocket:
    """A datagram socket standing in for systemd's: each notification with the pid
    the kernel says sent it (SO_PASSCRED)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[int, str]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(struct.calcsize("iII")))
            except (TimeoutError, OSError):
                continue
            pid = 0
            for level, kind, cred in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", cred[:12])[0]
            self.messages.append((pid, data.decode()))

    def wait_for(self, what: Callable[[str], bool], timeout: float = 30,
                 unless: Callable[[], bool] = lambda: False) -> str:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline and not unless():
            for _pid, message in self.messages[seen:]:
                if what(message):
                    return message
            seen = len(self.messages)
            time.sleep(0.05)
        raise AssertionError(f"no such notification: {self.messages[-5:]}")

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
        return True


def publish(redis_port: int, channel: str, payloads: list[str]) -> None:
    with socket.create_connection(("127.0.0.1", redis_port)) as redis:
        for payload in payloads:
            redis.sendall(f"PUBLISH {channel} {payload}\r\n".encode())
            redis.recv(100)


def hinted(stream: RawStream) -> bool:
    """The stream was given a retry: hint before it ended."""
    return b"\nretry:" in stream.raw or b"\r\nretry:" in stream.raw


class PortTaken(Exception):
    """The tree was refused its port at start: another process had taken it."""


class Tree:
    """`twistd -n emojistream --workers 2`, told it runs under systemd."""

    def __init__(self, tmp_path: Path, redis_url: str, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.notify = NotifySocket(tmp_path / "notify")
        self.seen_pids: set[int] = set()

        def start() -> None:
            self.port = free_port()
            self.proc = TwistdProcess(
                "emojistream", "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                "--redis", redis_url, "--node", "tree", "--drain-sec", "1", *args,
                env={"NOTIFY_SOCKET": str(self.notify.path), "WATCHDOG_USEC": "1000000",
                     "WORKERS": "2", **(env or {})})

        start()
        #: Starts the tree again on another port (see wait_serving).
        self._start_again = start

    @property
    def parent(self) -> int:
        return self.proc.proc.pid

    def workers(self) -> dict[int, int]:
        """Worker number -> pid, of the parent's children now."""
        found = {}
        for pid in self.proc.children():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                # Ended (or a zombie) since the list was read.
                continue
            for entry in environ:
                if entry.startswith(b"EMOJISTREAM_WORKER="):
                    found[int(entry.split(b"=")[1])] = pid
        self.seen_pids.update(found.values())
        return found

    def wait_serving(self, timeout: float = 30) -> dict[int, int]:
        for _ in range(2):
            # The port free when chosen may be another process's by the time the
            # tree binds it (other tests' daemons): then the tree is refused at start
            # in one line, and is started again on another port.
            try:
                self.notify.wait_for(lambda m: m.startswith("READY=1"), timeout,
                                     unless=self._refused)
                break
            except PortTaken:
                self.proc.terminate()
                self._start_again()
        else:
            self.notify.wait_for(lambda m: m.startswith("READY=1"), timeout)
        return self.workers()

    def _refused(self) -> bool:
        if self.proc.proc.poll() is not None and "cannot listen on" in self.proc.log():
            raise PortTaken(self.port)
        return False

    def end(self) -> int:
        code = self.proc.terminate()
        self.notify.close()
        return code


@pytest.fixture
def tree(tmp_path: Path, redis_server) -> Iterator[Tree]:
    tree = Tree(tmp_path, redis_server.url)
    try:
        yield tree
    finally:
        for pid in (*tree.seen_pids, tree.parent):
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        tree.end()


def test_workers_from_the_environment_start_exactly_n_and_only_the_parent_tells_systemd(
        tree: Tree):
    workers = tree.wait_serving()
    assert sorted(workers) == [1, 2]
    for pid in workers.values():
        # No worker starts workers of its own (WORKERS=2 is in the parent's environment).
        assert Path(f"/proc/{pid}/task/{pid}/children").read_text().split() == []
        environ = dict(e.split("=", 1) for e in
                       Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
        for private in ("WORKERS", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            assert private not in environ
    tree.notify.wait_for(lambda m: "2 of 2 workers serving" in m)
    assert tree.end() == 0
    senders = {pid for pid, _ in tree.notify.messages}
    assert senders == {tree.parent}
    kinds = [m.split("\n")[0] for _, m in tree.notify.messages]
    assert kinds.count("READY=1") == 1 and kinds[-1] == "STOPPING=1"


CASES = [(who, sig) for who in ("parent", "worker")
         for sig in ("SIGKILL", "SIGSTOP", "SIGHUP", "SIGUSR1", "SIGTERM")]


@pytest.mark.parametrize(("who", "name"), CASES, ids=[f"{w}-{s}" for w, s in CASES])
def test_every_process_killed_stopped_and_signalled_with_streams_open(
        tree: Tree, redis_server, who: str, name: str):
    workers = tree.wait_serving()
    streams = ManyStreams(tree.port, "/subscribe/details/T", STREAMS)
    try:
        streams.pump(streams.all_started, timeout=60)
        signum = signal.Signals[name]
        target = tree.parent if who == "parent" else workers[1]
        os.kill(target, signum)
        marked = [f"m{i}" for i in range(3)]

        def open_streams() -> list[RawStream]:
            return [s for s in streams.streams if not s.closed]

        def all_receive(payloads: list[str], among: list[RawStream]) -> None:
            publish(redis_server.port, "stream.tweet_updates.T", payloads)
            streams.pump(lambda: all(
                [e.data for e in s.events()][-len(payloads):] == payloads for s in among), 30)

        if who == "parent" and name == "SIGKILL":
            # The workers see their parent go, close their listeners and drain quickly.
            streams.pump(lambda: not open_streams(), timeout=15)
            wait_until(lambda: not any(pid_alive(p) for p in workers.values()), 10,
                       "workers outlived their parent")
            assert port_is_free(tree.port)
        elif (name in ("SIGSTOP", "SIGHUP", "SIGUSR1") and who == "parent" and \
                name != "SIGHUP") or (who == "worker" and name in ("SIGHUP", "SIGUSR1")):
            if name == "SIGSTOP":
                all_receive(marked, streams.streams)
                os.kill(target, signal.SIGCONT)
            else:
                tree.proc.wait_for_line(f"Received {name}")
                all_receive(marked, streams.streams)
            assert not any(s.closed for s in streams.streams)
        elif who == "parent" and name == "SIGHUP":
            tree.proc.wait_for_line("Rolling restart done", timeout=60)
            # The new workers listen, then subscribe: publish once they have.
            tree.proc.wait_for_lines(r"Redis subscriber connection .* is up", 4)
            streams.pump(lambda: not open_streams(), timeout=15)
            new = tree.workers()
            assert sorted(new) == [1, 2] and not set(new.values()) & set(workers.values())
            fresh = ManyStreams(tree.port, "/subscribe/details/T", 20)
            try:
                fresh.pump(fresh.all_started, 30)
                publish(redis_server.port, "stream.tweet_updates.T", marked)
                fresh.pump(lambda: all([e.data for e in s.events()] == marked
                                       for s in fresh.streams), 30)
            finally:
                fresh.close()
        elif who == "parent" and name == "SIGTERM":
            assert tree.proc.proc.wait(30) == 0
            streams.pump(lambda: not open_streams(), timeout=15)
        else:
            # One worker killed, stopped or told to stop: replaced, the other serves on.
            started = time.monotonic()
            streams.pump(lambda: len(open_streams()) < STREAMS, timeout=20)
            wait_until(lambda: tree.workers().get(1, target) != target, 15,
                       "no replacement worker")
            tree.notify.wait_for(lambda m: "2 of 2 workers serving" in m and
                                 str(tree.workers()[1]) != str(target), 15)
            replaced_in = time.monotonic() - started
            assert replaced_in < 10, replaced_in
            if name == "SIGSTOP":
                assert any("1 of 2 workers serving" in m for _, m in tree.notify.messages)
            # Once it has ended, its streams have all ended; the others hear on.
            wait_until(lambda: not pid_alive(target), 15, "the worker did not end")
            publish(redis_server.port, "stream.tweet_updates.T", marked)
            streams.pump(lambda: all(
                s.closed or [e.data for e in s.events()][-3:] == marked
                for s in streams.streams), 30)
            assert 0 < len(open_streams()) < STREAMS
        cut = [s for s in streams.streams if s.closed and not hinted(s)]
        if who == "worker" and name == "SIGKILL":
            assert len(cut) == STREAMS - len(open_streams())
        else:
            assert cut == []
    finally:
        streams.close()
    code = tree.end()
    assert code == (-9 if (who, name) == ("parent", "SIGKILL") else 0), tree.proc.log()
    wait_until(lambda: not any(pid_alive(p) for p in tree.seen_pids), 10, "orphans")
    assert port_is_free(tree.port)
    assert {pid for pid, _ in tree.notify.messages} == {tree.parent}
    assert "Traceback" not in tree.proc.log()


def test_a_worker_that_cannot_start_halts_the_tree_with_one_line(tmp_path: Path,
                                                                  redis_server):
    # Worker 2's admin port is taken: it can never start.
    while True:
        admin = free_port()
        if port_is_free(admin + 1):
            break
    taken = socket.socket()
    taken.bind(("127.0.0.1", admin + 1))
    taken.listen()
    tree = Tree(tmp_path, redis_server.url, "--admin-listen",
                f"tcp:{admin}:interface=127.0.0.1")
    try:
        code = tree.proc.proc.wait(60)
        workers = tree.seen_pids
        log = tree.proc.log()
        assert code == 1, log
        halts = [line for line in tree.proc.lines if "failed to start" in line]
        assert len(halts) == 1, log
        assert "worker 2 failed to start 3 times in a row" in halts[0]
        assert "Address already in use" in halts[0]
        assert log.count("Started worker 2") == 3
        assert not any(pid_alive(p) for p in workers)
        assert port_is_free(tree.port)
        assert not any(m.startswith("READY=1") for _, m in tree.notify.messages)
    finally:
        taken.close()
        tree.end()


def test_each_worker_has_its_own_admin_port_and_says_which_worker_it_is_in_json(
        tmp_path: Path, redis_server):
    while True:
        admin = free_port()
        if port_is_free(admin + 1):
            break
    tree = Tree(tmp_path, redis_server.url, "--admin-listen",
                f"tcp:{admin}:interface=127.0.0.1", env={"LOG_FORMAT": "json"})
    try:
        workers = tree.wait_serving()
        for number in (1, 2):
            with socket.create_connection(("127.0.0.1", admin + number - 1)) as conn:
                conn.sendall(b"GET /admin/status.json HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
            assert json.loads(data.partition(b"\r\n\r\n")[2])["node"] == \
                f"twisted-development-tree-{number}"
            metrics = subprocess.run(
                ["curl", "-s", f"http://127.0.0.1:{admin + number - 1}/metrics"],
                capture_output=True, text=True, timeout=10).stdout
            # Every sample says which worker it is from.
            samples = [line for line in metrics.splitlines()
                       if line and not line.startswith("#")]
            assert samples and all(f'worker="{number}"' in line for line in samples)
            assert f'emojistream_messages_delivered_total{{worker="{number}"}}' in metrics
    finally:
        assert tree.end() == 0
    # Every line JSON, the relayed ones saying which worker (and pid) they are from.
    records = [json.loads(line) for line in tree.proc.lines]
    serving = [r for r in records if r["message"].startswith("Serving HTTP on")]
    assert len(serving) == 4
    assert {(r["worker"], r["pid"]) for r in serving} == set(workers.items())
    assert any("worker" not in r and r["message"].startswith("Started worker")
               for r in records)


def _backlogs(port: int) -> list[int]:
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                         text=True, timeout=10).stdout
    return [int(line.split()[2]) for line in out.splitlines() if line.strip()]


def test_every_listener_gets_a_deep_backlog(tmp_path: Path, redis_server):
    admin = free_port()
    single_port = free_port()
    single = TwistdProcess("emojistream", "--listen", f"tcp:{single_port}",
                           "--admin-listen", f"tcp:{admin}:interface=127.0.0.1",
                           "--redis", redis_server.url)
    tree = Tree(tmp_path, redis_server.url)
    try:
        single.port()
        tree.wait_serving()
        assert _backlogs(single_port) == [1024]
        assert _backlogs(admin) == [1024]
        assert _backlogs(tree.port) == [1024, 1024]
    finally:
        assert single.terminate() == 0
        assert tree.end() == 0


def test_workers_run_the_parents_code_whatever_the_current_directory_holds(
        tmp_path: Path, redis_server):
    # A stale checkout in the current directory: its package would break a worker.
    stale = tmp_path / "checkout"
    (stale / "emojistream").mkdir(parents=True)
    (stale / "emojistream" / "__init__.py").write_text("raise ImportError('stale copy')\n")
    (stale / "twisted" / "plugins").mkdir(parents=True)
    (stale / "json.py").write_text("raise ImportError('stale json')\n")
    notify = NotifySocket(tmp_path / "notify")
    from daemonproc import TWISTD, repo_env

    env = repo_env()
    env.update({"NOTIFY_SOCKET": str(notify.path), "WORKERS": "2"})
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "--logfile=-", "emojistream", "--listen",
         f"tcp:{free_port()}:interface=127.0.0.1", "--redis", redis_server.url],
        cwd=stale, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        notify.wait_for(lambda m: m.startswith("READY=1"), 30)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        notify.close()
    assert proc.returncode == 0, out
    assert "stale" not in out
    assert sorted(p.name for p in (stale / "twisted" / "plugins").iterdir()) == []


def test_a_killed_demo_daemon_takes_its_redis_server_with_it():
    proc = TwistdProcess("emojistream", "--demo", "--listen", "tcp:0:interface=127.0.0.1")
    try:
        proc.port()
        proc.wait_for_line("Embedded Redis is ready")
        redis = proc.children()
        assert len(redis) == 1
        assert "redis-server" in Path(f"/proc/{redis[0]}/cmdline").read_text()
        proc.proc.kill()
        proc.proc.wait()
        wait_until(lambda: not pid_alive(redis[0]), 5, "redis-server outlived its daemon")
    finally:
        proc.terminate()


def test_a_second_tree_on_the_same_port_is_refused_not_merged(tmp_path: Path, redis_server):
    first = Tree(tmp_path, redis_server.url)
    try:
        first.wait_serving()
        from daemonproc import twistd

        result = twistd("-n", "--pidfile=", "emojistream", "--workers", "2", "--listen",
                        f"tcp:{first.port}:interface=127.0.0.1", "--redis", redis_server.url)
        out = result.stdout + result.stderr
        assert result.returncode == 1, out
        assert "Address already in use" in out and "Started worker" not in out, out
        assert len(_backlogs(first.port)) == 2
    finally:
        assert first.end() == 0


def test_with_demo_and_workers_one_worker_feeds(tmp_path: Path, redis_server):
    tree = Tree(tmp_path, redis_server.url, "--demo")
    try:
        tree.wait_serving()
        tree.proc.wait_for_lines(r"Redis subscriber connection .* is up", 2)
        tree.proc.wait_for_line(r"Redis demo feeder connection .* is up")
    finally:
        assert tree.end() == 0
    feeders = [line for line in tree.proc.lines if "demo feeder connection" in line
               and "is up" in line]
    assert len(feeders) == 1 and "worker-1 " in feeders[0], feeders


def _hexists(redis_port: int, key: str, field: str) -> bool:
    with socket.create_connection(("127.0.0.1", redis_port)) as redis:
        redis.sendall(f"HEXISTS {key} {field}\r\n".encode())
        return redis.recv(100) == b":1\r\n"


def test_a_replaced_worker_leaves_the_cluster_view_before_its_replacement_reports(
        tmp_path: Path, redis_server):
    # A drain longer than a report interval: the replacement reports while the old
    # worker still drains, and the old one's stop must not take that entry away.
    tree = Tree(tmp_path, redis_server.url, "--admin-report", "--drain-sec", "9")
    node = "twisted-development-tree-1"
    streams = None
    try:
        workers = tree.wait_serving()
        streams = ManyStreams(tree.port, "/subscribe/raw", 40)
        streams.pump(streams.all_started, 30)
        wait_until(lambda: _hexists(redis_server.port, "admin_stream_status", node), 15,
                   "worker 1 never reported")
        os.kill(workers[1], signal.SIGTERM)
        tree.notify.wait_for(lambda m: "2 of 2 workers serving" in m and
                             tree.workers().get(1) != workers[1], 15)
        # The replacement is listed by its first report (an interval after its start),
        # and stays listed through the old worker's drain and end.
        wait_until(lambda: _hexists(redis_server.port, "admin_stream_status", node), 8,
                   "the replacement is not listed")
        seen = []
        deadline = None
        while deadline is None or time.monotonic() < deadline:
            streams.pump(lambda: True, 1)
            seen.append(_hexists(redis_server.port, "admin_stream_status", node))
            if deadline is None and not pid_alive(workers[1]):
                deadline = time.monotonic() + 2
            time.sleep(0.05)
        assert all(seen), seen
    finally:
        if streams is not None:
            streams.close()
        assert tree.end() == 0
